"""Speed benchmark: training and sampling throughput of models A and B at their default sizes.

    python bench.py [--quick] [--json OUT] [--device DEVICE] [--precisions fp32,bf16]

Prints, per model and precision: training images/s (forward, MSE, backward, AdamW step,
through training.training_step), inference images/s (one forward pass), the achieved
GFLOP/s and its share of the measured matmul peak; the wall time of drawing 100 guided
digits with model B per sampler; the cost of the input pipeline relative to a step; and
the attention implementations (fused SDPA vs plain softmax(QK^T)V) at both models' shapes.

FLOPs are counted analytically from the shapes of every matmul-like op (linear, bmm,
attention) by torch.utils.flop_counter.FlopCounterMode on one real training step
(forward + backward), i.e. 2*M*N*K per (M, K) x (K, N) product; element-wise work is not
counted. The weights are random: speed does not depend on them.
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dit
from cli import run_main
from data import make_loader, to_model_range
from dit import DiT
from dit_cfg import ConditionalDiT
from images import check_output_file
from options import ArgumentParser, add_device_arg, autocast_dtype, default_precision, resolve_device
from sampling import generate_images
from scheduler import NoiseScheduler
from training import make_optimizer, training_step

# Both models at their default sizes, at the batches the speed goals are stated for
# (docs/performance.md): A 64x64 in 2x2 patches (1024 tokens), batch 16; B 32x32 in 4x4 patches
# (64 tokens), batch 128; both dim 256, depth 6, 8 heads.
MODELS = {
    "A": dict(model_class=DiT, config=dict(img_size=64, patch_size=2), batch=16),
    "B": dict(model_class=ConditionalDiT, config=dict(img_size=32, patch_size=4), batch=128),
}
SAMPLING_RUNS = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpm++2m", 20), ("dpm++2m", 10), ("dpm++2m", 6)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, iters, warmup=1):
    """Median wall time of fn() over `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[(len(times) - 1) // 2]  # the median (the faster of two)


def matmul_size(device):
    """n of the n x n x n peak matmul: 2048 keeps a CPU busy for a while; a GPU needs 8192
    before launch overhead stops mattering."""
    return 8192 if device.type == "cuda" else 2048


def matmul_peak(dtype, device, iters=10):
    """GFLOP/s of the fastest of `iters` n x n matmuls: the practical peak the steps are
    compared with (the best run, since a peak is what the hardware can do at all)."""
    n = matmul_size(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    seconds = min(seconds_per_call(lambda: a @ a, device, iters=1, warmup=0) for _ in range(iters))
    return 2 * n**3 / seconds / 1e9


def make_step(spec, device, amp_dtype, compile=False, batch=None):
    """A training step closure on random data, and the model (torch.compile'd with compile=True,
    as train.py --compile does). batch defaults to the spec's."""
    torch.manual_seed(0)
    model = spec["model_class"](**spec["config"]).to(device).train()
    step_model = torch.compile(model) if compile else model
    scheduler = NoiseScheduler(device=device)
    optimizer = make_optimizer(model, 1e-4, device)
    batch = batch or spec["batch"]
    x0 = torch.rand(batch, model.channels, model.img_size, model.img_size, device=device) * 2 - 1
    labels = torch.randint(0, 10, (batch,), device=device) if isinstance(model, ConditionalDiT) else None

    def step():
        training_step(step_model, scheduler, optimizer, x0, labels, amp_dtype=amp_dtype, grad_clip=1.0)

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=amp_dtype is not None):
            t = torch.randint(0, 1000, (batch,), device=device)
            model(x0, t) if labels is None else model(x0, t, labels)

    return model, step, forward


def count_flops(fn):
    """FLOPs of one fn() call. The math SDPA backend is forced while counting: it is built
    from matmuls that FlopCounterMode counts, while the fused CPU kernel is not counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_step_flops(spec, device, amp_dtype):
    """FLOPs of one training step at the spec's batch. Counted on a batch of one image and
    scaled: every counted product (linear layers, attention, patch embedding) has the batch
    as one of its dimensions, so the count is exactly linear in it. The math attention
    backend that counting needs is 2-3x slower than the fused one at A's 1024 tokens."""
    _, step_of_one, _ = make_step(spec, device, amp_dtype, batch=1)
    return count_flops(step_of_one) * spec["batch"]


def bench_training(name, spec, device, precision, iters, peaks):
    amp_dtype = autocast_dtype(precision, device)
    model, step, forward = make_step(spec, device, amp_dtype)
    batch = spec["batch"]
    step_flops = training_step_flops(spec, device, amp_dtype)
    step_s = seconds_per_call(step, device, iters)  # its warm-up call allocates the AdamW state
    forward_s = seconds_per_call(forward, device, iters)
    gflops = step_flops / step_s / 1e9
    return {
        "model": name, "precision": precision, "batch": batch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "train_img_s": round(batch / step_s, 1),
        "infer_img_s": round(batch / forward_s, 1),
        "step_gflop": round(step_flops / 1e9, 1),
        "train_gflop_s": round(gflops, 1),
        "share_of_peak": round(gflops / peaks[precision], 3),
    }


def bench_compiled(name, spec, device, precision, iters):
    """Training images/s with the model under torch.compile (the first calls compile it)."""
    _, step, _ = make_step(spec, device, autocast_dtype(precision, device), compile=True)
    compile_start = time.perf_counter()
    step()
    synchronize(device)
    compile_s = time.perf_counter() - compile_start
    step_s = seconds_per_call(step, device, iters, warmup=2)
    return {"model": name, "precision": precision, "compile_s": round(compile_s, 1),
            "compiled_img_s": round(spec["batch"] / step_s, 1)}


def diffusers_peers(device):
    """diffusers' models at the same shapes (--diffusers; `pip install diffusers` first):
    DiTTransformer2DModel for A, PixArtTransformer2DModel (DiT + cross-attention) for B."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
    common = dict(num_attention_heads=8, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6)
    peer_a = DiTTransformer2DModel(**common, sample_size=64, patch_size=2).to(device)
    peer_b = PixArtTransformer2DModel(**common, sample_size=32, patch_size=4, cross_attention_dim=256).to(device)

    def forward_a(x, t):
        return peer_a(x, timestep=t, class_labels=torch.zeros_like(t)).sample

    def forward_b(x, t):
        context = torch.randn(x.shape[0], 4, 256, device=device)  # 4 condition tokens, like ours
        return peer_b(x, encoder_hidden_states=context, timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    return {"A": (peer_a, forward_a), "B": (peer_b, forward_b)}


def bench_peer(name, peer, forward, device, precision, iters):
    """The same training step as training.training_step, on a diffusers model."""
    spec = MODELS[name]
    batch, size = spec["batch"], spec["config"]["img_size"]
    optimizer = make_optimizer(peer, 1e-4, device)  # the same optimizer as ours
    x0 = torch.rand(batch, 1, size, size, device=device) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = forward(x0 + noise, t)  # the noising itself does not matter for speed
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = seconds_per_call(step, device, iters)
    return {"model": name, "precision": precision, "diffusers_img_s": round(batch / step_s, 1)}


def bench_sampling(device, precision, quick, compile=False):
    """Wall time of 100 guided digits (10 per label) with model B at its default size.

    Runs that would take long (DDPM's 1000 model calls on a CPU; everything but the
    shortest run with --quick) are estimated from the measured seconds per step of the
    shortest run, and marked so. An untimed one-step run first warms up (and with
    compile=True compiles) the model at the doubled batch's shape. With compile=True only the
    shortest run is timed, with the model under torch.compile."""
    amp_dtype = autocast_dtype(precision, device)
    torch.manual_seed(0)
    model = ConditionalDiT().to(device).eval()
    scheduler = NoiseScheduler(device=device)
    labels = torch.arange(10).repeat_interleave(10)
    sampling_model = torch.compile(model) if compile else model

    def run(sampler, steps):
        return generate_images(sampling_model, scheduler, 100, labels=labels, sampler=sampler, steps=steps,
                               device=device, amp_dtype=amp_dtype)

    shortest = min(SAMPLING_RUNS, key=lambda run_spec: run_spec[1])
    run(shortest[0], 1)  # warm-up
    shortest_seconds = seconds_per_call(lambda: run(*shortest), device, iters=1 if quick else 3, warmup=0)
    if compile:
        return [{"sampler": shortest[0], "steps": shortest[1], "precision": precision,
                 "compiled_seconds_100_digits": round(shortest_seconds, 2)}]
    rows = []
    for sampler, steps in SAMPLING_RUNS:
        if (sampler, steps) == shortest:
            seconds, how = shortest_seconds, "measured"
        elif quick or (device.type == "cpu" and steps > 100):
            seconds, how = shortest_seconds / shortest[1] * steps, "estimated"
        else:
            seconds, how = seconds_per_call(lambda: run(sampler, steps), device, iters=1, warmup=0), "measured"
        rows.append({"sampler": sampler, "steps": steps, "precision": precision,
                     "seconds_100_digits": round(seconds, 2), "how": how})
    return rows


def bench_input_pipeline(device, step_seconds, batch=128, img_size=32, iters=50):
    """Drawing and converting one batch from the in-memory uint8 set, vs one training step."""
    images = torch.randint(0, 256, (60000, 1, img_size, img_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (60000,))
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
    loader = make_loader(images, labels, batch, seed=0)
    batches = iter(loader)

    def draw():
        x, y = next(batches)
        to_model_range(x, device)
        y.to(device)

    seconds = seconds_per_call(draw, device, iters)
    return {"batch_s": seconds, "share_of_step": round(seconds / step_seconds, 4)}


def bench_attention(device, precision, iters):
    """Forward + backward of one attention call at both models' shapes, fused vs plain."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = []
    for name, (batch, heads, tokens, head_dim) in {"A": (16, 8, 1024, 32), "B": (128, 8, 64, 32)}.items():
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype,
                               requires_grad=True) for _ in range(3))

        def plain():
            out = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
            out.sum().backward()

        def fused():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        def chosen():
            dit.attention(q, k, v).sum().backward()

        rows.append({"model": name, "tokens": tokens, "precision": precision,
                     "plain_ms": round(1e3 * seconds_per_call(plain, device, iters), 2),
                     "sdpa_ms": round(1e3 * seconds_per_call(fused, device, iters), 2),
                     "dit_attention_ms": round(1e3 * seconds_per_call(chosen, device, iters), 2)})
    return rows


def precision_list(text):
    """'fp32,bf16' -> ['fp32', 'bf16'] (an argparse type)."""
    precisions = text.split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise argparse.ArgumentTypeError(f"expected fp32, bf16 or both, comma-separated, got {text!r}")
    return precisions


def print_table(rows):
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))
    print()


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and estimated sampling times (87-105 s on 2 AVX2 cores)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="also write the figures to this JSON file")
    parser.add_argument("--diffusers", action="store_true",
                        help="also time diffusers' DiT / PixArt models at the same shapes "
                             "(needs `pip install diffusers`; not a requirement of this repo)")
    parser.add_argument("--precisions", type=precision_list, default=None,
                        help="comma-separated, e.g. fp32,bf16 (default: fp32, plus bf16 where the "
                             "hardware runs it natively; emulated bf16 is too slow to be worth timing)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the training step and the shortest sampling run under torch.compile, "
                             "in the last of --precisions "
                             "(compiling takes a minute or more per model)")
    add_device_arg(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    precisions = args.precisions or ["fp32"] + (["bf16"] if default_precision(device) == "bf16" else [])
    if args.json:
        check_output_file(args.json)  # before the minutes of timing, not after
    iters = 2 if args.quick else 10
    torch.set_flush_denormal(True)

    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device} ({hardware}), precisions {precisions}\n")
    peaks = {p: matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32, device) for p in precisions}
    print(f"matmul peak ({matmul_size(device)}^3): " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + "\n")

    training = [bench_training(name, spec, device, p, iters, peaks)
                for name, spec in MODELS.items() for p in precisions]
    print("training step (forward + MSE + backward + AdamW) and inference forward")
    print_table(training)

    def ours_img_s(name, precision):  # our eager training images/s, from the table above
        return next(r["train_img_s"] for r in training if r["model"] == name and r["precision"] == precision)

    peers = []
    if args.diffusers:
        for name, (peer, forward) in diffusers_peers(device).items():
            peers += [bench_peer(name, peer, forward, device, p, iters) for p in precisions]
        for row in peers:
            ours = ours_img_s(row["model"], row["precision"])
            row.update(ours_img_s=ours, speedup=round(ours / row["diffusers_img_s"], 2))
        print("training step vs diffusers at the same shapes")
        print_table(peers)

    compiled = []
    if args.compile:  # in the last precision only (bf16 where it is native): compiling takes a while
        compiled = [bench_compiled(name, spec, device, precisions[-1], iters) for name, spec in MODELS.items()]
        for row in compiled:
            eager = ours_img_s(row["model"], row["precision"])
            row.update(eager_img_s=eager, speedup=round(row["compiled_img_s"] / eager, 2))
        print("training step under torch.compile")
        print_table(compiled)

    attention = [row for p in precisions for row in bench_attention(device, p, iters)]
    print("attention, forward + backward of one call (batch x 8 heads x tokens x 32)")
    print_table(attention)

    b_step = next(r for r in training if r["model"] == "B" and r["precision"] == precisions[-1])
    pipeline = bench_input_pipeline(device, step_seconds=b_step["batch"] / b_step["train_img_s"])
    print(f"input pipeline: {1e3 * pipeline['batch_s']:.2f} ms per batch of 128 "
          f"= {100 * pipeline['share_of_step']:.2f}% of model B's {precisions[-1]} training step\n")

    sampling, compiled_sampling = [], []
    for p in precisions[-1:]:  # the last one: by default bf16 where the hardware runs it natively
        sampling += bench_sampling(device, p, args.quick)
    print("sampling 100 guided digits with model B (10 per digit, 32x32, doubled CFG batch)")
    print_table(sampling)
    if args.compile:
        compiled_sampling = bench_sampling(device, precisions[-1], args.quick, compile=True)
        for row in compiled_sampling:
            eager = next(r for r in sampling if (r["sampler"], r["steps"]) == (row["sampler"], row["steps"]))
            row.update(eager_seconds=eager["seconds_100_digits"],
                       speedup=round(eager["seconds_100_digits"] / row["compiled_seconds_100_digits"], 2))
        print("sampling under torch.compile")
        print_table(compiled_sampling)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "hardware": hardware,
                       "matmul_peak_gflop_s": peaks, "training": training, "diffusers": peers, "compiled": compiled,
                       "compiled_sampling": compiled_sampling,
                       "attention": attention,
                       "input_pipeline": pipeline, "sampling": sampling}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
