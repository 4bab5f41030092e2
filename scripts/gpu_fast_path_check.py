#!/usr/bin/env python
"""GPU check of the batched fast path at full size (random weights): equal greedy tokens, no recompiles.

For two page sizes (a US-letter page at 200 dpi and one at 150 dpi), greedy decoding of
``--tokens`` new tokens (eos ignored) by
  plain     transformers ``generate`` (dynamic cache, stock SDPA)
  eager     the runner on ``StaticDecoder(compile=False)``: static cache + our decode attention, no compile
  compiled  the runner's fast path (``compile=True``: inductor, CUDA graphs; ``--slots`` slots)
  batched   both pages at once through the compiled runner (they decode in one batch)
and reports, against plain (and batched against compiled alone): the agreeing prefix (tokens
until the first difference) and the share of equal positions; the dynamo compile count over both
pages and the batched run after warm-up ("recompiles"), and the CUDA-graph skips. Random weights
at bf16 make near-ties between logits far more common than a trained model does, so a late first
difference is expected; the prefill token (no decode step involved) must agree. Prints one JSON
line last; exit code 1 when a recompile happened, CUDA graphs were skipped or the first token
differs.

    python scripts/gpu_fast_path_check.py --tokens 256 [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402 - after the sys.path set-up


def agreement(reference: list[int], other: list[int]) -> dict:
    prefix = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        prefix += 1
    equal = sum(a == b for a, b in zip(reference, other))
    return {"prefix": prefix, "equal_positions": equal, "of": len(reference),
            "first_difference_at": None if prefix == len(reference) else prefix}


def main(argv=None) -> int:
    import transformers

    from bench_pipeline import build_random_full_size, device_description, png_bytes, synth_page
    from image_utils import ImagePolicy
    from image_utils.decode import decode_image_bytes
    from model_runner.fast_decode import StaticDecoder, dynamo_compile_count
    from model_runner.processing import load_processor
    from model_runner.loading import resolve_attention
    from model_runner.runner import ModelRunner

    parser = argparse.ArgumentParser(description="fast path = plain path on greedy tokens, full size, GPU")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=4, help="slots of the compiled fast path (max batch size)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt-type", default="prompt_layout_all_en")
    parser.add_argument("--max-new-tokens-limit", type=int, default=24000)
    parser.add_argument("--json-out")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random checkpoint instead of the full size (a CPU smoke run of this script)")
    parser.add_argument("--page-sizes", default="1700x2200,1275x1650", help="comma-separated WxH pages")
    args = parser.parse_args(argv)

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: this check is for a GPU machine", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    llm_attn, vision_attn = resolve_attention("auto", device)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.tiny:
        from model_runner.modeling_dots_ocr import DotsOCRForCausalLM
        from model_runner.tiny import build_tiny_checkpoint

        folder = build_tiny_checkpoint(work / "tiny", seed=0)
        model = DotsOCRForCausalLM.from_pretrained(folder, dtype=dtype, device=device, attn_implementation=llm_attn,
                                                   vision_attn_implementation=vision_attn)
    else:
        model, folder = build_random_full_size(device, dtype, llm_attn, vision_attn, work)
    build_s = time.perf_counter() - start
    processor = load_processor(folder)
    n = args.tokens

    start = time.perf_counter()
    compiled = ModelRunner.from_model(model, processor, model_path=folder, compile=True, max_batch_size=args.slots,
                                      max_new_tokens_limit=args.max_new_tokens_limit)
    warmup_s = time.perf_counter() - start
    if compiled.decoder is None:
        print("the fast path did not build (see the log above)", file=sys.stderr)
        return 1
    cache_len = compiled.decoder.max_cache_len
    eager = ModelRunner.from_model(model, processor, model_path=folder,
                                   decoder=StaticDecoder(model, cache_len, slots=1, compile=False))

    def tokens_of(runner, image) -> list[int]:
        result = runner.generate(image, args.prompt_type, temperature=0, max_new_tokens=n, ignore_eos=True)
        return [t.id for t in result.tokens]

    eos = model.generation_config.eos_token_id
    pad = min(eos) if isinstance(eos, (list, tuple)) else eos
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    before = dynamo_compile_count()
    from bench_pipeline import _cudagraph_skips

    skips_before = _cudagraph_skips()
    pages, images = {}, {}
    sizes = [tuple(int(v) for v in item.lower().split("x")) for item in args.page_sizes.split(",")]
    for size in sizes:
        name = f"page_{size[0]}x{size[1]}"
        image = images[name] = decode_image_bytes(png_bytes(synth_page(size, seed=len(pages))), ImagePolicy())
        inputs = compiled.prepare(image, args.prompt_type)
        prompt = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            t0 = time.perf_counter()
            plain = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, **greedy)
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            plain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = tokens_of(compiled, image)
        fast_s = time.perf_counter() - t0
        slow = tokens_of(eager, image)
        ref = plain[0, prompt:].tolist()
        pages[name] = {
            "size": list(size), "prompt_tokens": prompt, "fast": fast,
            "compiled_vs_plain": agreement(ref, fast),
            "eager_vs_plain": agreement(ref, slow),
            "compiled_vs_eager": agreement(slow, fast),
            "plain_s": plain_s, "compiled_s": fast_s,
        }
    # every page at once through the compiled runner (one batch), against each page alone
    batched: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda k=name: batched.__setitem__(k, tokens_of(compiled, images[k])))
               for name in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, page in pages.items():
        page["batched_vs_alone"] = agreement(page.pop("fast"), batched.get(name, []))
    recompiles = dynamo_compile_count() - before
    skips = _cudagraph_skips() - skips_before
    first_token_ok = all(p["compiled_vs_plain"]["prefix"] >= 1 and p["batched_vs_alone"]["prefix"] >= 1
                         for p in pages.values())
    result = {
        "check": "fast path vs plain generate, greedy, " + ("tiny" if args.tiny else "full size random weights"),
        "device": device_description(device), "dtype": args.dtype, "torch": torch.__version__,
        "transformers": transformers.__version__, "tokens": n, "static_cache_tokens": cache_len,
        "slots": compiled.decoder.slots, "batch_buckets": list(compiled.decoder.batch_buckets),
        "kv_buckets": list(compiled.decoder.kv_buckets), "max_rows_seen": compiled._engine.max_rows_seen,
        "build_s": build_s, "compile_warmup_s": warmup_s, "pages": pages, "recompiles": recompiles,
        "cudagraph_skips": skips, "first_token_agrees": first_token_ok,
        "ok": recompiles == 0 and skips == 0 and first_token_ok,
    }
    for name, page in pages.items():
        c, e = page["compiled_vs_plain"], page["eager_vs_plain"]
        print(f"{name}: prompt {page['prompt_tokens']} tokens | compiled vs plain: prefix {c['prefix']}/{n}, "
              f"equal {c['equal_positions']}/{n} | eager vs plain: prefix {e['prefix']}/{n} | "
              f"compiled vs eager: prefix {page['compiled_vs_eager']['prefix']}/{n} | "
              f"batched vs alone: prefix {page['batched_vs_alone']['prefix']}/{n}, "
              f"equal {page['batched_vs_alone']['equal_positions']}/{n} | "
              f"plain {page['plain_s']:.2f} s, compiled {page['compiled_s']:.2f} s")
    print(f"recompiles after warm-up: {recompiles} | cudagraph skips: {skips} | ok: {result['ok']}")
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    compiled.decoder.close()
    eager.decoder.close()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
