#!/usr/bin/env python
"""Time each stage of one page through dots.ocr, on any device, and print a table + one JSON line.

Stages (each: median of --runs timed runs after an untimed warm-up run):
  image_decode      PNG bytes -> RGB PIL image (the server's decoder, image_utils)
  resize_patchify   28-px smart resize + processor (patches, prompt tokens) on the CPU
  to_device         the processor's tensors to the model's device
  vision            the vision tower alone (one image, SDPA/flash per image, no N x N mask)
  llm_prefill       the LLM over the whole prompt (image rows already merged), one forward
  prefill_total     prompt in -> first new token (vision + LLM prefill + one token)
  decode            new tokens per second after the first: (N - 1) / (t(N) - t(1)), fixed N (eos ignored)
  e2e_page          PNG bytes -> full answer of N tokens through ModelRunner.stream (the server's path)
Plus: first vs second request after start-up, the dynamo compile count over two page sizes
("recompiles", after warm-up), peak GPU memory, and with --baseline the same figures for plain
transformers ``generate`` (dynamic cache) in the same run. With --url, the full HTTP path against a
running server: server overhead = HTTP time - in-process model time for the same request.

Models: --model-path DIR (a checkpoint folder, tiny or real), --demo (the tiny random checkpoint,
built in a temp dir), --random-full-size (the released sizes with random weights, built on the meta
device and materialised on the device; tokenizer/processor from the tiny builder).

Examples:
  python scripts/bench_pipeline.py --demo --new-tokens 8 --runs 1 --page-size 280x360
  python scripts/bench_pipeline.py --random-full-size --baseline --new-tokens 1000
  python scripts/bench_pipeline.py --demo --url http://127.0.0.1:5000 --new-tokens 16
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the sys.path set-up

from dots_ocr_server.eval.machine import cpu_name, print_result  # noqa: E402 - after the sys.path set-up

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 28 or h < 28:
        raise argparse.ArgumentTypeError("page sides must be at least 28 px")
    return w, h


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def timed(fn, device, runs: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``runs`` runs after ``warmup`` untimed ones; last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, runs)):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def synth_page(size: tuple[int, int], seed: int = 0):
    """A synthetic US-letter-like page: a title, paragraphs of word-like blocks and real text,
    and a small table. Deterministic for a seed."""
    import random

    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    rng = random.Random(seed)
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    unit = max(6, w // 85)  # ~20 px line height on a 1700-px page
    try:
        font = ImageFont.load_default(size=int(unit * 0.9))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    margin = w // 12
    y = margin
    draw.rectangle([margin, y, margin + w // 2, y + 2 * unit], fill=(10, 10, 10))  # title bar
    y += 4 * unit
    words = "the quick brown fox jumps over a lazy dog while invoices tables and figures wait".split()
    table_at = h // 2
    while y < h - margin - unit:
        if abs(y - table_at) < unit:  # a 4 x 5 table
            cols, rows = 4, 5
            cw = (w - 2 * margin) // cols
            for r in range(rows + 1):
                draw.line([margin, y + r * 2 * unit, w - margin, y + r * 2 * unit], fill=(0, 0, 0), width=2)
            for c in range(cols + 1):
                draw.line([margin + c * cw, y, margin + c * cw, y + rows * 2 * unit], fill=(0, 0, 0), width=2)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cw + unit // 2, y + r * 2 * unit + unit // 2),
                              f"{rng.randint(0, 9999)}", fill=(0, 0, 0), font=font)
            y += rows * 2 * unit + 2 * unit
            continue
        x = margin
        if rng.random() < 0.5:
            line = " ".join(rng.choice(words) for _ in range(12))
            draw.text((x, y), line, fill=(0, 0, 0), font=font)
        else:
            while x < w - margin - 3 * unit:
                word = rng.randint(2, 9) * unit // 2
                draw.rectangle([x, y + unit // 5, min(x + word, w - margin), y + unit], fill=(30, 30, 30))
                x += word + unit // 2
        y += int(1.6 * unit)
        if rng.random() < 0.12:
            y += unit  # paragraph break
    return image


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def init_random_(model, seed: int = 0) -> None:
    """Random weights in place, on the model's device: Linear/Conv N(0, 1/fan_in), embeddings
    N(0, 1), biases N(0, 0.02^2), norm weights 1 + N(0, 0.05^2) (the tiny builder's recipe, which
    keeps activations O(1) and the logits peaked rather than flat)."""
    from model_runner.tiny import scale_init_noise

    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            generator = torch.Generator(device=param.device).manual_seed(seed * 100003 + index)
            noise = torch.empty(param.shape, device=param.device, dtype=torch.float32)
            noise.normal_(generator=generator)
            value = scale_init_noise(name, noise)
            param.copy_(value.to(param.dtype))
            del noise, value


def build_random_full_size(device: torch.device, dtype: torch.dtype, llm_attn: str, vision_attn: str,
                           work_dir: Path, seed: int = 0):
    """(model, tokenizer/processor folder): the released architecture with random weights, built on
    the meta device and materialised on ``device`` (no weight file is written). Token ids come from
    the tiny builder's tokenizer, so the config's image/video ids are set to that tokenizer's."""
    from transformers import GenerationConfig

    from model_runner.modeling_dots_ocr import DotsOCRConfig, DotsOCRForCausalLM
    from model_runner.tiny import OFFICIAL_CONFIG, build_tiny_checkpoint

    folder = build_tiny_checkpoint(work_dir / "tokenizer-from-tiny", seed=0, shards=1)
    tiny_config = json.loads((folder / "config.json").read_text())
    config_dict = json.loads(json.dumps(OFFICIAL_CONFIG))
    config_dict["image_token_id"] = tiny_config["image_token_id"]
    config_dict["video_token_id"] = tiny_config["video_token_id"]
    config = DotsOCRConfig.from_dict(config_dict)
    config._attn_implementation = llm_attn
    config.dtype = dtype
    with torch.device("meta"):
        model = DotsOCRForCausalLM(config, vision_attn_implementation=vision_attn)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_random_(model, seed)
    model._recompute_non_persistent_buffers(device)
    model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.config._attn_implementation = llm_attn
    model.eval()
    return model, folder


class InstantBackend:
    """A decoding backend (the ``BatchEngine`` interface) with no model time: its "prefill" makes eos
    certain, so that every request ends on its first token. With it, a request costs exactly the
    server's HTTP and image path plus ``prepare``."""

    def __init__(self, eos_id: int, vocab_size: int, device):
        self.logits = torch.full((1, vocab_size), -1e4, device=device)
        self.logits[0, int(eos_id)] = 1e4

    def prefill(self, inputs, timings):
        timings["vision_s"] = timings["prefill_s"] = 0.0
        return None, self.logits.clone()

    def add(self, handle):
        raise RuntimeError("an instant request ends at its first token")

    def step(self, tokens, positions):
        raise RuntimeError("an instant request ends at its first token")

    def remove(self, rows):
        return []

    def reset(self):
        pass


def instant_runner(runner):
    """A runner on ``runner``'s model and processor whose generation is instant (InstantBackend)."""
    from model_runner.runner import ModelRunner

    backend = InstantBackend(min(runner.generator.eos_ids), int(runner.model.lm_head.weight.shape[0]), runner.device)
    return ModelRunner.from_model(runner.model, runner.processor, model_path=runner.model_path, decoder=backend)


def serve_stub(argv: list[str]) -> int:
    """The server (``server.serve``: waitress, server.py's flags) on a runner that generates
    instantly (``instant_runner``)."""
    import server

    config = server.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.serve(config, runner=make_server_runner(config))
    return 0


def make_server_runner(config):
    """The instant runner for ``config`` (the demo checkpoint built first when asked for)."""
    import dataclasses

    from model_runner.runner import ModelRunner

    if config.demo:
        from model_runner.tiny import build_tiny_checkpoint

        folder = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-stub-")) / "DotsOCR-tiny-random", seed=0)
        config = dataclasses.replace(config, model_path=str(folder))
    loaded = ModelRunner.from_config(config, compile=False).load()
    return instant_runner(loaded)


def plain_runner(runner):
    """A runner on the same model and processor without the fast path (plain transformers path)."""
    from model_runner.runner import ModelRunner

    return ModelRunner.from_model(runner.model, runner.processor, model_path=runner.model_path, compile=False)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-path", help="checkpoint folder (tiny or real)")
    source.add_argument("--demo", action="store_true", help="build the tiny random checkpoint in a temp dir")
    source.add_argument("--random-full-size", action="store_true",
                        help="released sizes, random weights, materialised on the device (no file written)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn-implementation", default="auto")
    parser.add_argument("--new-tokens", type=int, default=256, help="fixed output length (eos ignored)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per stage (median)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="timed runs of the plain-generate decode")
    parser.add_argument("--image", help="page image file (default: a synthetic page of --page-size)")
    parser.add_argument("--page-size", type=parse_size, default=(1700, 2200),
                        help="synthetic page size WxH (default 1700x2200: US letter at 200 dpi)")
    parser.add_argument("--second-page-size", type=parse_size, default=(1275, 1650),
                        help="the other page size of the recompile check (default 1275x1650: letter at 150 dpi)")
    parser.add_argument("--prompt-type", default="prompt_layout_all_en")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="fast path (static cache + compiled decode); default: on with CUDA, off on CPU")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the decode step (default: inductor on CUDA, eager on CPU)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=24000,
                        help="the server's limit; sizes the static cache as the server would")
    parser.add_argument("--baseline", action="store_true", help="also time plain transformers generate")
    parser.add_argument("--url", help="time the HTTP path against this running server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--http-runs", type=int, default=3)
    parser.add_argument("--http-new-tokens", type=int, default=None,
                        help="max_new_tokens of the HTTP requests (default: --new-tokens)")
    parser.add_argument("--http-only", action="store_true", help="with --url: skip the stage timings")
    parser.add_argument("--http-stub", action="store_true",
                        help="also start server.py (waitress, same model flags) with a runner that generates "
                             "instantly, and time the HTTP + image path alone against it")
    parser.add_argument("--stub-port", type=int, default=5099)
    parser.add_argument("--json-out", help="also write the JSON figures to this file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_runner(args, work_dir: Path):
    """(runner, description of the model, load seconds)."""
    from model_runner.loading import resolve_attention, resolve_device, resolve_dtype
    from model_runner.runner import ModelRunner

    start = time.perf_counter()
    fast_options = {"backend": args.compile_backend} if args.compile_backend else {}
    if args.random_full_size:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        llm_attn, vision_attn = resolve_attention(args.attn_implementation, device)
        model, folder = build_random_full_size(device, dtype, llm_attn, vision_attn, work_dir, args.seed)
        from model_runner.processing import load_processor

        runner = ModelRunner.from_model(model, load_processor(folder), model_path=folder, compile=args.compile,
                                        max_new_tokens_limit=args.max_new_tokens_limit,
                                        fast_path_options=fast_options)
        label = "random-full-size"
    else:
        if args.demo:
            from model_runner.tiny import build_tiny_checkpoint

            path = build_tiny_checkpoint(work_dir / "DotsOCR-tiny-random", seed=0)
            label = "tiny (demo)"
        else:
            path = Path(args.model_path)
            label = str(path)
        runner = ModelRunner(path, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                             compile=args.compile, max_new_tokens_limit=args.max_new_tokens_limit,
                             fast_path_options=fast_options).load()
    sync(runner.device)
    return runner, label, time.perf_counter() - start


def e2e_page(runner, data: bytes, prompt_type: str, new_tokens: int) -> tuple[float, int]:
    """PNG bytes -> full answer of exactly ``new_tokens`` tokens (eos ignored) through
    ModelRunner.stream (the server's path)."""
    from image_utils import ImagePolicy
    from image_utils.decode import decode_image_bytes
    from model_runner.runner import GenerationStats

    sync(runner.device)
    start = time.perf_counter()
    image = decode_image_bytes(data, ImagePolicy())
    stats = GenerationStats()
    for _ in runner.stream(image, prompt_type, temperature=0, max_new_tokens=new_tokens, stats=stats,
                           ignore_eos=True):
        pass
    sync(runner.device)
    return time.perf_counter() - start, stats.new_tokens


def vision_variants(model, inputs, device, runs) -> dict[str, float]:
    """Vision tower seconds with the default SDPA choice and, on CUDA, with cuDNN attention first."""
    out = {}

    def run():
        with torch.inference_mode():
            return model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    out["vision_s"], _ = timed(run, device, runs)
    if device.type == "cuda":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
            with sdpa_kernel(order, set_priority=True):
                out["vision_cudnn_first_s"], _ = timed(run, device, runs)
        except Exception as exc:  # noqa: BLE001 - an optional variant
            out["vision_cudnn_first_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def llm_prefill(model, inputs, device, runs) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        embeds = model.model.embed_tokens(inputs["input_ids"])
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = model.merge_image_features(inputs["input_ids"], embeds, features)

    def run():
        with torch.inference_mode():
            return model(inputs_embeds=embeds, past_key_values=DynamicCache(config=model.config), use_cache=True,
                         logits_to_keep=1).logits

    seconds, _ = timed(run, device, runs)
    return seconds


class StepClock:
    """A stopping criterion that never stops and notes when each new token reached the host:
    plain ``generate`` calls it once per new token, after the token is known."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def rate(self) -> float | None:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def plain_generate(model, inputs, new_tokens: int, clock: StepClock | None = None, **sampling):
    from transformers import StoppingCriteriaList

    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None) if not sampling else sampling
    eos = model.generation_config.eos_token_id
    pad = min(eos) if isinstance(eos, (list, tuple)) else eos
    if clock is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([clock])
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                              **kwargs)


def decode_rate(generate_n, device, new_tokens: int, runs: int) -> dict[str, float]:
    """Decode tokens/s = (N - 1) / (time of the last new token - time of the first), both as the
    host saw them (``generate_n(n)`` returns that rate); median over runs. Also the prompt -> first
    token time (t(1)) and the whole t(N)."""
    t1, _ = timed(lambda: generate_n(1), device, runs)
    rates, totals = [], []
    for _ in range(max(1, runs)):
        sync(device)
        start = time.perf_counter()
        rates.append(generate_n(new_tokens))
        sync(device)
        totals.append(time.perf_counter() - start)
    tn = statistics.median(totals)
    by_difference = (new_tokens - 1) / (tn - t1) if new_tokens > 1 and tn > t1 else None
    return {"prefill_total_s": t1, "generate_s": tn, "decode_tok_s": median(rates),
            "decode_tok_s_by_difference": by_difference}


def runner_decode(runner, image, prompt_type: str, new_tokens: int, runs: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> dict[str, float | None]:
    """Decode tokens/s through the runner = (N - 1) / (time of the last new token - time of the
    first), fixed N (eos ignored); prompt -> first token (vision + prefill) and the whole
    generation; medians over ``runs`` after one untimed run."""
    from model_runner.runner import GenerationStats

    def once() -> GenerationStats:
        stats = GenerationStats()
        runner.generate(image, prompt_type, temperature=temperature, top_p=top_p, max_new_tokens=new_tokens,
                        stats=stats, ignore_eos=True, seed=0)
        return stats

    once()
    runs_stats = [once() for _ in range(max(1, runs))]
    rates = [(s.new_tokens - 1) / s.decode_s for s in runs_stats if s.new_tokens > 1 and s.decode_s > 0]
    return {"prefill_total_s": median([s.vision_s + s.prefill_s for s in runs_stats]),
            "generate_s": median([s.generate_s for s in runs_stats]), "decode_tok_s": median(rates)}


def plain_generate_rate(model, inputs, n: int) -> float | None:
    clock = StepClock()
    plain_generate(model, inputs, n, clock)
    return clock.rate()


def http_path(args, runner, data: bytes, new_tokens: int) -> dict:
    """POST the page to a running server; compare with the same request run in-process."""
    from image_utils import ImagePolicy
    from image_utils.decode import decode_image_bytes

    body = json.dumps({"image": base64.b64encode(data).decode("ascii"), "image_format": "base64",
                       "prompt_type": args.prompt_type, "max_new_tokens": new_tokens,
                       "temperature": 0.0}).encode()
    url = args.url.rstrip("/")
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        health = json.loads(response.read())

    def post():
        request = urllib.request.Request(url + "/ocr", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())["response"]

    image = decode_image_bytes(data, ImagePolicy())

    def model():  # from the decoded page to the answer, as the server's runner does it
        return runner.generate(image, args.prompt_type, temperature=0, max_new_tokens=new_tokens).text

    post(), model()  # warm both
    http_times, model_times, differences, same = [], [], [], True
    for _ in range(max(1, args.http_runs)):  # interleaved, so that drift cancels in the differences
        start = time.perf_counter()
        http_text = post()
        http_times.append(time.perf_counter() - start)
        sync(runner.device)
        start = time.perf_counter()
        model_text = model()
        sync(runner.device)
        model_times.append(time.perf_counter() - start)
        differences.append(http_times[-1] - model_times[-1])
        same = same and http_text == model_text
    decode_s, _ = timed(lambda: decode_image_bytes(data, ImagePolicy()), None, args.http_runs)
    return {"url": url, "server_health": health, "request_bytes": len(body), "new_tokens_max": new_tokens,
            "http_s": statistics.median(http_times), "model_s": statistics.median(model_times),
            "server_overhead_s": statistics.median(differences), "server_overhead_runs_s": differences,
            "server_overhead_min_s": min(http_times) - min(model_times), "http_runs_s": http_times,
            "model_runs_s": model_times,
            "image_decode_in_overhead_s": decode_s, "same_output": same}


def http_stub(args, runner, data: bytes) -> dict:
    """Start server.py with an instant runner (same model flags), time the HTTP + image path."""
    import subprocess

    if args.random_full_size:
        raise SystemExit("--http-stub needs --demo or --model-path (the server loads the model itself)")
    model_flags = ["--demo"] if args.demo else ["--model-path", args.model_path]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-stub", *model_flags, "--device", args.device,
           "--port", str(args.stub_port), "--threads", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.stub_port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if json.loads(response.read()).get("model_loaded"):
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the stub server did not come up (exit {proc.poll()})")
            time.sleep(0.5)
        stub_args = argparse.Namespace(**{**vars(args), "url": url})
        out = http_path(stub_args, instant_runner(runner), data, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out["note"] = ("server.py with an instant generate: http_s = HTTP + image path + prepare (resize, "
                   "patchify, to device); model_s = prepare in-process; overhead = the difference")
    return out


class _Figures(dict):
    """The figures; each one is also written to stderr as it comes, so that a run stopped by a
    timeout still leaves what it measured."""

    def __init__(self, initial: dict):
        super().__init__(initial)
        print(f"[bench] {json.dumps(initial, default=str)}", file=sys.stderr, flush=True)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"[bench] {key} = {json.dumps(value, default=str)}", file=sys.stderr, flush=True)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def run_benchmark(args) -> dict:
    import transformers

    from image_utils import ImagePolicy, resize_for_model
    from image_utils.decode import decode_image_bytes
    from model_runner.fast_decode import dynamo_compile_count
    from model_runner.prompts import prompt_text
    from model_runner.runner import GenerationStats

    transformers.logging.set_verbosity_error()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    runner, label, load_s = make_runner(args, work_dir)
    device, model, decoder = runner.device, runner.model, runner.decoder
    runner.repetition_window = 0  # random weights loop; fixed-length runs must not be cut short
    N = args.new_tokens
    R = args.runs
    figures = _Figures({
        "device": device_description(device), "device_type": device.type,
        "dtype": str(runner.dtype).removeprefix("torch."), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "model": label,
        "fast_path": decoder is not None, "attention": list(runner.attn_implementation),
        "compile_backend": getattr(decoder, "backend", None), "compile_mode": getattr(decoder, "mode", None),
        "static_cache_tokens": getattr(decoder, "max_cache_len", None), "new_tokens": N, "runs": R,
        "load_s": load_s, "warmup_s": getattr(decoder, "warmup_seconds", None),
    })

    page = synth_page(args.page_size, args.seed) if not args.image else None
    data = Path(args.image).read_bytes() if args.image else png_bytes(page)
    if args.http_stub:
        figures["http_stub"] = http_stub(args, runner, data)
    if args.url and args.http_only:
        figures["http"] = http_path(args, runner, data, args.http_new_tokens or N)
    if args.http_only:
        return figures
    second = png_bytes(synth_page(args.second_page_size, args.seed + 1))

    # -- first and second request after start-up (nothing else has run on a real page yet) ----------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_s, _ = e2e_page(runner, data, args.prompt_type, N)
    second_s, produced = e2e_page(runner, data, args.prompt_type, N)
    figures.update(first_request_s=first_s, second_request_s=second_s, first_over_second=first_s / second_s,
                   e2e_new_tokens=produced)
    if device.type == "cuda":
        figures["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    # -- CPU stages -------------------------------------------------------------------------------
    policy = ImagePolicy()
    figures["image_decode_s"], image = timed(lambda: decode_image_bytes(data, policy), None, R)
    min_pixels, max_pixels = runner.processor.pixel_limits
    processor = runner.processor

    def resize_and_patchify():
        resized = resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels)
        text = processor.render_prompt(prompt_text(args.prompt_type))
        return processor(text=text, images=[resized])

    figures["resize_patchify_s"], _ = timed(resize_and_patchify, None, R)
    cpu_inputs = runner.processor.page_inputs(image, args.prompt_type).tensors  # the real prompt, on the CPU
    cpu_inputs = dict(cpu_inputs)
    figures["to_device_s"], inputs = timed(
        lambda: {k: v.to(device) for k, v in cpu_inputs.items()}, device, R)
    inputs["pixel_values"] = inputs["pixel_values"].to(runner.dtype)
    grid = inputs["image_grid_thw"][0].tolist()
    figures["page"] = {"size": list(image.size), "model_size": [grid[2] * 14, grid[1] * 14],
                       "patches": int(grid[0] * grid[1] * grid[2]), "prompt_tokens": int(inputs["input_ids"].shape[1])}

    # -- device stages ----------------------------------------------------------------------------
    figures.update(vision_variants(model, inputs, device, R))
    figures["llm_prefill_s"] = llm_prefill(model, inputs, device, R)
    if decoder is not None:
        fast = runner_decode(runner, image, args.prompt_type, N, R)
        fast["decode_sampled_tok_s"] = runner_decode(runner, image, args.prompt_type, N, 1, 0.1)["decode_tok_s"]
        fast["decode_top_p_tok_s"] = runner_decode(runner, image, args.prompt_type, N, 1, 0.7, 0.9)["decode_tok_s"]
        fast["score_precision"] = decoder.score_precision
    else:
        fast = decode_rate(lambda n: plain_generate_rate(model, inputs, n), device, N, R)
    figures.update(fast)
    figures["e2e_page_s"], _ = timed(lambda: e2e_page(runner, data, args.prompt_type, N)[0], None,
                                     R, warmup=0)

    # -- recompile check: two page sizes after warm-up -------------------------------------------------
    if decoder is not None:
        before = dynamo_compile_count()
        skips_before = _cudagraph_skips()
        for blob in (data, second):
            img = decode_image_bytes(blob, policy)
            stats = GenerationStats()
            runner.generate(img, args.prompt_type, temperature=0, max_new_tokens=min(N, 16), ignore_eos=True,
                            stats=stats)
            runner.generate(img, args.prompt_type, temperature=0.5, top_p=0.9, max_new_tokens=min(N, 16),
                            ignore_eos=True)
        figures["recompiles"] = dynamo_compile_count() - before
        figures["cudagraph_skips"] = _cudagraph_skips() - skips_before
        figures["second_page"] = {"size": list(args.second_page_size),
                                  "prompt_tokens": stats.prompt_tokens}

    # -- baseline: plain transformers generate, dynamic cache, same run ---------------------------------
    if args.baseline:
        base = decode_rate(lambda n: plain_generate_rate(model, inputs, n), device, N, args.baseline_runs)
        base["e2e_page_s"], _ = e2e_page(plain_runner(runner), data, args.prompt_type, N)
        figures["baseline"] = base
        if figures.get("decode_tok_s") and base.get("decode_tok_s"):
            figures["speedup_decode"] = figures["decode_tok_s"] / base["decode_tok_s"]
        figures["speedup_e2e"] = base["e2e_page_s"] / figures["e2e_page_s"]

    if args.url:
        runner.repetition_window = 512  # as the server runs it
        figures["http"] = http_path(args, runner, data, args.http_new_tokens or N)
    return figures


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "cudagraph_skips" in k))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value, unit="s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return str(value)


TARGETS = {"decode_tok_s": ">= 400 tok/s (H100/H200, full size, letter page)",
           "vision_s": "<= 0.30 s (letter page)", "e2e_page_s": "<= 3.5 s (1,000 tokens)",
           "peak_gpu_mem_gib": "<= 12 GiB", "first_over_second": "<= 1.10",
           "server_overhead_s": "<= 0.150 s (CPU, 200-dpi page)"}


def report(figures: dict) -> str:
    base = figures.get("baseline", {})
    rows = [] if "page" not in figures else [
        ("image decode (PNG -> RGB)", _fmt(figures.get("image_decode_s")), "", ""),
        ("28-px resize + patchify", _fmt(figures.get("resize_patchify_s")), "", ""),
        ("to device", _fmt(figures.get("to_device_s")), "", ""),
        ("vision tower", _fmt(figures.get("vision_s")), "", TARGETS["vision_s"]),
    ]
    if "vision_cudnn_first_s" in figures:
        rows.append(("vision tower, cuDNN attention first", _fmt(figures["vision_cudnn_first_s"]), "", ""))
    rows += [] if "page" not in figures else [
        ("LLM prefill (whole prompt)", _fmt(figures.get("llm_prefill_s")), "", ""),
        ("prompt -> first token", _fmt(figures.get("prefill_total_s")), _fmt(base.get("prefill_total_s")), ""),
        ("decode", _fmt(figures.get("decode_tok_s"), "tok/s"), _fmt(base.get("decode_tok_s"), "tok/s"),
         TARGETS["decode_tok_s"]),
    ]
    if figures.get("decode_sampled_tok_s"):
        rows.append(("decode, sampled T=0.1 top_p=1", _fmt(figures["decode_sampled_tok_s"], "tok/s"), "", ""))
    if figures.get("decode_top_p_tok_s"):
        rows.append(("decode, sampled T=0.7 top_p=0.9", _fmt(figures["decode_top_p_tok_s"], "tok/s"), "", ""))
    rows += [] if "page" not in figures else [
        (f"end to end page ({figures['new_tokens']} tokens)", _fmt(figures.get("e2e_page_s")),
         _fmt(base.get("e2e_page_s")), TARGETS["e2e_page_s"]),
        ("first request after start-up", _fmt(figures.get("first_request_s")), "", ""),
        ("second request", _fmt(figures.get("second_request_s")), "",
         f"first/second = {figures.get('first_over_second', 0):.2f} ({TARGETS['first_over_second']})"),
    ]
    if "peak_gpu_mem_gib" in figures:
        rows.append(("peak GPU memory (one page)", _fmt(figures["peak_gpu_mem_gib"], "GiB"), "",
                     TARGETS["peak_gpu_mem_gib"]))
    if "recompiles" in figures:
        rows.append(("recompiles over two page sizes", str(figures["recompiles"]), "",
                     f"cudagraph skips: {figures.get('cudagraph_skips')}"))
    stub = figures.get("http_stub")
    if stub:
        rows += [("HTTP, instant-model server (full path)", _fmt(stub["http_s"]), "", ""),
                 ("prepare in-process (resize, patchify)", _fmt(stub["model_s"]), "", ""),
                 ("HTTP + image path beyond model time", _fmt(stub["server_overhead_s"]), "",
                  TARGETS["server_overhead_s"])]
    http = figures.get("http")
    if http:
        rows += [("HTTP request (full path)", _fmt(http["http_s"]), "", ""),
                 ("model time in-process (same request)", _fmt(http["model_s"]), "",
                  f"same output: {http['same_output']}"),
                 ("server overhead = HTTP - model", _fmt(http["server_overhead_s"]), "", TARGETS["server_overhead_s"]),
                 ("  (fastest HTTP - fastest model)", _fmt(http["server_overhead_min_s"]), "", "")]
    page = figures.get("page", {})
    head = [
        f"device: {figures['device']}  |  dtype {figures['dtype']}  |  torch {figures['torch']}  |  "
        f"transformers {figures['transformers']}  |  python {figures['python']}",
        f"model: {figures['model']}  |  fast path: {figures['fast_path']} ({figures.get('compile_backend')}, "
        f"{figures.get('compile_mode')})  |  attention llm/vision: {'/'.join(figures['attention'])}  |  "
        f"static cache: {figures.get('static_cache_tokens')} tokens",
        f"page: {page.get('size')} -> model {page.get('model_size')}, {page.get('patches')} patches, "
        f"{page.get('prompt_tokens')} prompt tokens  |  median of {figures['runs']} runs  |  "
        f"load {_fmt(figures.get('load_s'))}, warm-up {_fmt(figures.get('warmup_s'))}",
    ]
    widths = [max(len(r[i]) for r in rows + [("stage", "fast path" if figures["fast_path"] else "this run",
                                                "plain generate", "target")]) for i in range(4)]
    header = ("stage", "fast path" if figures["fast_path"] else "this run", "plain generate", "target")
    lines = head + [""] + ["  ".join(c.ljust(w) for c, w in zip(header, widths)),
                           "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-stub"]:
        return serve_stub(argv[1:])
    args = parse_args(argv)
    if not (args.model_path or args.demo or args.random_full_size):
        print("choose a model: --model-path DIR, --demo or --random-full-size", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    figures = run_benchmark(args)
    print_result(report(figures), figures, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
