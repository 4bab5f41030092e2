"""The fast decoding path (model_runner.fast_decode.StaticDecoder) on the tiny checkpoint, CPU.

The CUDA specifics (inductor, CUDA graphs, pinned-memory read-back) need a GPU and are checked by
scripts/gpu_check.sh; here the same code runs eager or through dynamo with CPU-safe backends.
"""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from forcing import FailsAtStep, ForcedTokens, aperiodic, plain_token_ids
from model_runner.fast_decode import (SCORE_PRECISION, StaticDecoder, decode_attention, default_max_cache_len,
                                      dynamo_compile_count, fp32_out_supported, sample_next_token)
from model_runner.runner import GenerationStats, ModelRunner

REPO = Path(__file__).resolve().parent.parent
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def _page(width, height, rows=8):
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row in range(rows):
        draw.rectangle([20, 20 + row * 32, width - 20 - (row % 3) * 30, 34 + row * 32], fill=(20, 20, 20))
    return image


def _plain(model, inputs, new_tokens):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, pad_token_id=0, **GREEDY)


@pytest.fixture(scope="module")
def eager_decoder(runner):
    decoder = StaticDecoder(runner.model, 2048, compile=False)
    yield decoder
    decoder.close()


@pytest.fixture(scope="module")
def fast_runner(tiny_ckpt):
    """A runner whose fast path is the StaticDecoder without compile (forward hooks work there)."""
    fast = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", repetition_window=60,
                       repetition_max_period=16).load()
    fast.decoder = StaticDecoder(fast.model, 2048, compile=False)
    fast.fast_path = True
    yield fast
    fast.decoder.close()


# -- equal outputs ---------------------------------------------------------------------------------


def test_eager_greedy_identical_to_generate(runner, eager_decoder):
    for size in ((220, 300), (420, 280)):
        inputs = runner.prepare(_page(*size), "prompt_ocr")
        ref = _plain(runner.model, inputs, 32)
        out = eager_decoder.generate(**inputs, max_new_tokens=32, pad_token_id=0, **GREEDY)
        assert out.shape == ref.shape
        assert torch.equal(out, ref)
    timings = eager_decoder.last_timings
    assert timings["new_tokens"] == out.shape[1] - inputs["input_ids"].shape[1]
    assert timings["prefill_s"] > 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_greedy_identical_and_no_recompiles(runner, backend):
    # aot_eager also runs the float32-output matmul layout that CUDA uses (emulated on CPU)
    precision = "emulate" if backend == "aot_eager" else None
    decoder = StaticDecoder(runner.model, 2048, compile=True, backend=backend, score_precision=precision)
    try:
        decoder.warmup()
        assert decoder.warmed_up and decoder.compiled
        before = dynamo_compile_count()
        sizes = ((220, 300), (300, 500)) if backend == "eager" else ((300, 500),)
        lengths = set()
        for size in sizes:  # different image sizes -> different prompt lengths
            inputs = runner.prepare(_page(*size), "prompt_layout_all_en" if size[0] == 300 else "prompt_ocr")
            lengths.add(inputs["input_ids"].shape[1])
            ref = _plain(runner.model, inputs, 24)
            out = decoder.generate(**inputs, max_new_tokens=24, pad_token_id=0, **GREEDY)
            assert torch.equal(out, ref)
            torch.manual_seed(0)
            decoder.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
        assert len(lengths) == len(sizes)
        assert dynamo_compile_count() - before == 0, "the decode step recompiled"
    finally:
        decoder.close()
        SCORE_PRECISION["mode"] = "native"


def test_fp32_out_is_not_used_on_cpu_float32():
    assert not fp32_out_supported(torch.device("cpu"), torch.float32)
    assert SCORE_PRECISION["mode"] == "native"


def test_decode_attention_matches_sdpa():
    torch.manual_seed(0)
    q_heads, kv_heads, dim, length, valid = 12, 2, 16, 64, 37
    query = torch.randn(1, q_heads, 1, dim)
    key = torch.randn(1, kv_heads, length, dim)
    value = torch.randn(1, kv_heads, length, dim)
    mask = (torch.arange(length) < valid).view(1, 1, 1, length)

    class Module:
        num_key_value_groups = q_heads // kv_heads
        is_causal = True

    ref = torch.nn.functional.scaled_dot_product_attention(query, key[:, :, :valid], value[:, :, :valid],
                                                           enable_gqa=True).transpose(1, 2)
    try:
        for mode in ("native", "emulate"):  # "emulate": the CUDA float32-output layout, on CPU
            SCORE_PRECISION["mode"] = mode
            for chunk in (16, 64, 0):  # four chunks, one chunk, no chunking
                out, _ = decode_attention(Module(), query, key, value, mask, scaling=dim ** -0.5, kv_chunk=chunk)
                assert out.shape == (1, 1, q_heads, dim)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        SCORE_PRECISION["mode"] = "native"
    additive = torch.zeros(1, 1, 1, length).masked_fill(~mask, float("-inf"))
    out, _ = decode_attention(Module(), query, key, value, additive, kv_chunk=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cache_is_reused_not_reallocated(runner, eager_decoder):
    pointers = [layer.keys.data_ptr() for layer in eager_decoder.cache.layers]
    inputs = runner.prepare(_page(220, 300), "prompt_ocr")
    eager_decoder.generate(**inputs, max_new_tokens=4, ignore_eos=True)
    eager_decoder.generate(**inputs, max_new_tokens=4, ignore_eos=True)
    assert [layer.keys.data_ptr() for layer in eager_decoder.cache.layers] == pointers
    assert eager_decoder.max_cache_len == 2048


def test_ignore_eos_and_min_new_tokens_give_fixed_lengths(runner, eager_decoder):
    inputs = runner.prepare(_page(220, 300), "prompt_ocr")
    eos = sorted(eager_decoder.eos_ids)[0]
    with ForcedTokens(runner.model, lambda step: eos):
        out = eager_decoder.generate(**inputs, max_new_tokens=5, ignore_eos=True)
        assert out.shape[1] - inputs["input_ids"].shape[1] == 5
        stopped = eager_decoder.generate(**inputs, max_new_tokens=5)
        assert stopped.shape[1] - inputs["input_ids"].shape[1] == 1
    # min_new_tokens masks eos like generate does: same tokens as plain generate with it
    ref = runner.model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, **GREEDY)
    out = eager_decoder.generate(**inputs, max_new_tokens=12, min_new_tokens=12, **GREEDY)
    assert torch.equal(out, ref)


def test_too_long_request_falls_back_to_plain_generate(runner):
    small = StaticDecoder(runner.model, 64, compile=False)
    try:
        inputs = runner.prepare(_page(220, 300), "prompt_ocr")
        out = small.generate(**inputs, max_new_tokens=8, pad_token_id=0, **GREEDY)
        assert small.fallbacks == 1
        assert torch.equal(out, _plain(runner.model, inputs, 8))
    finally:
        small.close()


def test_batch_and_padding_are_rejected(runner, eager_decoder):
    inputs = runner.prepare(_page(220, 300), "prompt_ocr")
    with pytest.raises(ValueError, match="batch 1"):
        eager_decoder.generate(input_ids=inputs["input_ids"].repeat(2, 1), max_new_tokens=2)
    mask = inputs["attention_mask"].clone()
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        eager_decoder.generate(input_ids=inputs["input_ids"], attention_mask=mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="unsupported"):
        eager_decoder.generate(**inputs, max_new_tokens=2, num_beams=2)


# -- sampling --------------------------------------------------------------------------------------


def test_sample_next_token_rules_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(1)
    logits = torch.randn(1, 500) * 3
    ids = torch.zeros(1, 1, dtype=torch.long)
    for temperature, top_k, top_p in ((0.7, 0, 0.9), (1.3, 40, 0.5), (0.1, 0, 1.0)):
        scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(ids, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(ids, scores)
        allowed = torch.isfinite(scores[0])
        draws = {int(sample_next_token(logits, temperature, top_p, top_k)) for _ in range(300)}
        assert all(bool(allowed[d]) for d in draws)
        if top_p < 1 or top_k:
            assert int(allowed.sum()) < 500
    # a tiny nucleus keeps only the most likely token
    assert {int(sample_next_token(logits, 1.0, 1e-6)) for _ in range(20)} == {int(logits.argmax())}
    assert int(sample_next_token(logits, 1.0, 1.0, top_k=1)) == int(logits.argmax())


def test_sampling_runs_on_the_fast_path(fast_runner, page_image):
    torch.manual_seed(0)
    result = fast_runner.generate(page_image, "prompt_ocr", temperature=1.0, top_p=0.9, max_new_tokens=16)
    assert result.finish_reason in ("eos", "length")
    assert 1 <= result.stats.new_tokens <= 16


# -- the runner on the fast path ---------------------------------------------------------------------


def test_runner_compile_on_cpu_streaming_equals_plain(tiny_ckpt, runner, page_image):
    fast = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", compile=True, max_new_tokens_limit=512).load()
    try:
        assert fast.fast_path and fast.decoder is not None and fast.decoder.warmed_up
        wanted = default_max_cache_len(11289600, 14, 2, 512)  # largest page + 512 new tokens
        assert wanted <= fast.decoder.max_cache_len < wanted + 512 and fast.decoder.max_cache_len % 512 == 0
        assert not runner.fast_path
        stats = GenerationStats()
        pieces = list(fast.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=24, stats=stats))
        again = fast.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=24)
        plain = runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=24)
        assert "".join(pieces) == again.text == plain.text
        assert stats.finish_reason == again.finish_reason == plain.finish_reason
        assert stats.new_tokens == plain.stats.new_tokens
    finally:
        fast.decoder.close()


def test_from_config_passes_compile(tiny_ckpt):
    from server import ServerConfig

    config = ServerConfig(model_path=str(tiny_ckpt), device="cpu", compile=False, max_new_tokens_limit=100)
    built = ModelRunner.from_config(config)
    assert built.compile is False and built.max_new_tokens_limit == 100
    assert ModelRunner(tiny_ckpt, device="cpu").compile is None


def test_length_and_eos_on_the_fast_path(fast_runner, page_image):
    ids = plain_token_ids(fast_runner, 50)
    with ForcedTokens(fast_runner.model, aperiodic(ids)):
        result = fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=7)
    assert (result.finish_reason, result.stats.new_tokens) == ("length", 7)
    eos = sorted(fast_runner._eos_ids())[-1]
    with ForcedTokens(fast_runner.model, lambda step: eos if step == 3 else ids[step]):
        result = fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=50)
    assert (result.finish_reason, result.stats.new_tokens) == ("eos", 4)


def test_cancel_stops_the_fast_path_within_a_step(fast_runner, page_image):
    ids = plain_token_ids(fast_runner, 50)
    stats = GenerationStats()
    with ForcedTokens(fast_runner.model, aperiodic(ids)) as forced:
        stream = fast_runner.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=1500, stats=stats)
        next(stream)
        started = time.perf_counter()
        stream.close()
        closed_in = time.perf_counter() - started
        steps_after_close = forced.step
        time.sleep(0.05)
        assert forced.step == steps_after_close, "decoding went on after the stream closed"
    assert not [t for t in threading.enumerate() if t.name == "dots-ocr-generate" and t.is_alive()]
    assert stats.finish_reason == "cancelled"
    assert stats.new_tokens < 1500
    assert closed_in < 5
    assert fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=3).stats.new_tokens <= 3


def test_repetition_guard_fires_on_the_fast_path(fast_runner, page_image):
    cycle = plain_token_ids(fast_runner, 3)
    with ForcedTokens(fast_runner.model, lambda step: cycle[step % 3]):
        result = fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=400)
    assert result.finish_reason == "repetition"
    assert 60 <= result.stats.new_tokens < 80


def test_an_error_in_decoding_reaches_the_caller_and_the_worker_survives(fast_runner, page_image):
    with FailsAtStep(fast_runner.model, 3, "boom inside fast decoding"):
        with pytest.raises(RuntimeError, match="boom inside fast decoding"):
            list(fast_runner.stream(page_image, "prompt_ocr", temperature=0, max_new_tokens=50))
    assert fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=3).stats.new_tokens >= 1


# -- the benchmark, CI-sized --------------------------------------------------------------------------


def test_bench_pipeline_runs_and_prints_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--demo", "--new-tokens", "8", "--runs", "1",
           "--page-size", "280x364", "--second-page-size", "224x280", "--compile", "--baseline",
           "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert json.loads(out.read_text()) == figures
    assert "stage" in proc.stdout and "decode" in proc.stdout and "device:" in lines[0]
    for key in ("device", "dtype", "torch", "transformers", "image_decode_s", "resize_patchify_s", "vision_s",
                "llm_prefill_s", "prefill_total_s", "decode_tok_s", "e2e_page_s", "first_request_s",
                "second_request_s", "recompiles"):
        assert key in figures, key
    assert figures["fast_path"] is True and figures["recompiles"] == 0
    assert figures["e2e_new_tokens"] == 8
    assert figures["baseline"]["decode_tok_s"] > 0


def test_bench_http_path_against_a_live_server(runner):
    """The --url part of the benchmark: HTTP time, in-process model time, overhead, same output."""
    from werkzeug.serving import make_server

    from server import create_app

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_pipeline

    server = make_server("127.0.0.1", 0, create_app({"image_root": None}, runner=runner), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        args = bench_pipeline.parse_args(["--demo", "--url", url, "--http-runs", "2", "--prompt-type", "prompt_ocr"])
        data = bench_pipeline.png_bytes(bench_pipeline.synth_page((280, 364)))
        figures = bench_pipeline.http_path(args, runner, data, 4)
    finally:
        server.shutdown()
    assert figures["same_output"] is True
    assert figures["http_s"] > 0 and figures["model_s"] > 0
    assert len(figures["server_overhead_runs_s"]) == 2
    assert figures["server_health"]["model_loaded"] is True


def test_bench_http_stub_times_the_http_and_image_path(tmp_path):
    """--http-stub starts server.py (gunicorn) with an instant generate and times the rest."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "stub.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--demo", "--device", "cpu", "--http-stub",
           "--http-only", "--http-runs", "1", "--page-size", "280x364", "--stub-port", str(port),
           "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stub = json.loads(out.read_text())["http_stub"]
    assert stub["same_output"] is True and stub["http_s"] > 0 and "server_overhead_s" in stub
    assert "HTTP + image path beyond model time" in proc.stdout
