"""The batched fast path (model_runner.fast_decode.StaticDecoder) on the tiny checkpoint, CPU.

Most tests run the decoder eager (``compile=False``: the same code without dynamo); one compiles
the step (dynamo with a CPU backend) and checks that nothing recompiles after the warm-up. The
CUDA specifics (inductor, CUDA graphs, the free-memory check on a real GPU) are checked by
scripts/gpu_check.sh.
"""
import gc
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
from model_runner.decoding import DecodingOptions, GenerationInputError, sample_next_token
from model_runner.fast_decode import (StaticDecoder, batch_buckets, decode_attention, default_max_cache_len,
                                      dynamo_compile_count, fp32_out_supported, kv_buckets, slots_that_fit)
from model_runner.runner import GenerationStats, ModelRunner

REPO = Path(__file__).resolve().parent.parent
SLOTS = 8
GREEDY = DecodingOptions(temperature=0).validate()


def _page(width, height, rows=8):
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for row in range(rows):
        draw.rectangle([20, 20 + row * 32, width - 20 - (row % 3) * 30, 34 + row * 32], fill=(20, 20, 20))
    return image


PAGES = {"small": _page(220, 300), "wide": _page(420, 280), "tall": _page(300, 500)}


@pytest.fixture(scope="module")
def plain_runner(tiny_ckpt):
    """The plain path (DynamicBatch), the reference; its own model (tests hook lm_head)."""
    return ModelRunner(tiny_ckpt, device="cpu", dtype="float32", max_batch_size=SLOTS, repetition_window=60,
                       repetition_max_period=16).load()


@pytest.fixture(scope="module")
def fast_runner(plain_runner):
    """The same model behind the fast path, eager (forward hooks work there). kv_chunk 64: the
    tiny pages' rows (105 to 215 prompt tokens) cross KV buckets (128, 256, 512 ...) as they grow."""
    decoder = StaticDecoder(plain_runner.model, 2048, slots=SLOTS, compile=False, kv_chunk=64)
    decoder.warmup()
    fast = ModelRunner.from_model(plain_runner.model, plain_runner.processor, decoder=decoder,
                                  max_batch_size=SLOTS, repetition_window=60, repetition_max_period=16)
    yield fast
    decoder.close()


def _alone(runner, page, new_tokens, **kwargs):
    result = runner.generate(PAGES[page], "prompt_ocr", temperature=0, max_new_tokens=new_tokens, **kwargs)
    return [t.id for t in result.tokens], result.finish_reason


def _request(runner, page, new_tokens, ignore_eos=True):
    """The engine request the runner makes for a greedy page (its eos ignored: a fixed length)."""
    import contextvars

    from model_runner.generation import GenerationRequest, PagePrompt

    request = GenerationRequest(PagePrompt(PAGES[page], "prompt_ocr"), GREEDY, max_new_tokens=new_tokens,
                                ignore_eos=ignore_eos)
    return runner.generator._engine_request(request, contextvars.copy_context())[1]


def _run_joined(runner, requests, join_at):
    """Run engine requests; request k joins when the first one has seen ``join_at[k]`` steps (the
    first one's should_stop hook, called by the loop once per step, submits the others). Waits
    for all of them, then returns them."""
    engine = runner.engine
    for _ in requests:
        engine.reserve()
    waiting = sorted(zip(join_at[1:], range(1, len(requests))))
    seen = [0]
    own_stop = requests[0].should_stop

    def hook():
        seen[0] += 1
        while waiting and waiting[0][0] <= seen[0]:
            engine.submit(requests[waiting.pop(0)[1]])
        return bool(own_stop and own_stop())

    requests[0].should_stop = hook
    try:
        engine.submit(requests[0])
        assert requests[0].done.wait(60), "the first request did not finish"
        assert not waiting, "the first request ended before the others joined"
        for request in requests:
            assert request.done.wait(60), "a request did not finish"
    finally:
        for _ in requests:
            engine.release()
    return requests


# -- same answers ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_batched_equals_alone_with_rows_joining_and_leaving(plain_runner, fast_runner):
    plan = [("tall", 40, 0), ("small", 12, 3), ("wide", 25, 7), ("small", 9, 15)]  # page, tokens, join step
    alone = {(page, n): _alone(plain_runner, page, n, ignore_eos=True) for page, n, _ in plan}
    for page, n, _ in plan:  # the fast path alone gives the plain answer too
        assert _alone(fast_runner, page, n, ignore_eos=True) == alone[(page, n)]
    for runner in (fast_runner, plain_runner):  # and batched, on both backends
        requests = _run_joined(runner, [_request(runner, p, n) for p, n, _ in plan], [j for _, _, j in plan])
        for request, (page, n, _) in zip(requests, plan):
            assert (request.generated, request.finish_reason) == alone[(page, n)], (runner.decoder, page, n)
    decoder = fast_runner.decoder
    assert fast_runner.engine.max_rows_seen >= 3
    assert decoder.rows == 0


@pytest.mark.slow
def test_each_row_ends_on_its_own_and_failures_stay_with_their_request(plain_runner, fast_runner):
    reference, _ = _alone(plain_runner, "wide", 30, ignore_eos=True)
    long_answer = _alone(plain_runner, "tall", 40, ignore_eos=True)
    eos_at = next(i for i in range(3, 30) if reference[i] not in reference[:i])

    class Guard:  # the repetition guard's interface: (ids [1, n], scores) -> bool [1]
        def __init__(self, fire_after, error=False):
            self.fire_after, self.error, self.calls = fire_after, error, 0

        def __call__(self, ids, scores):
            self.calls += 1
            if self.calls >= self.fire_after:
                if self.error:
                    raise RuntimeError("guard exploded")
                return torch.ones(1, dtype=torch.bool)
            return torch.zeros(1, dtype=torch.bool)

    long = _request(fast_runner, "tall", 40)
    by_eos = _request(fast_runner, "wide", 30)
    by_eos.eos_ids = frozenset({reference[eos_at]})
    by_length = _request(fast_runner, "wide", 6)
    by_guard = _request(fast_runner, "wide", 30)
    by_guard.guard = Guard(7)
    cancelled = _request(fast_runner, "wide", 30)
    calls = [0]
    cancelled.should_stop = lambda: (calls.__setitem__(0, calls[0] + 1) or calls[0] > 4)
    failing = _request(fast_runner, "wide", 30)
    failing.guard = Guard(3, error=True)
    broken = _request(fast_runner, "wide", 30)
    broken.inputs = dict(broken.inputs, image_grid_thw=broken.inputs["image_grid_thw"] * 2)  # prefill fails

    requests = [long, by_eos, by_length, by_guard, cancelled, failing, broken]
    _run_joined(fast_runner, requests, [0, 1, 2, 3, 4, 5, 6])

    assert (long.generated, long.finish_reason) == long_answer
    assert (by_eos.finish_reason, by_eos.generated) == ("eos", reference[:eos_at + 1])
    assert (by_length.finish_reason, by_length.generated) == ("length", reference[:6])
    assert (by_guard.finish_reason, by_guard.generated) == ("repetition", reference[:7])
    assert cancelled.finish_reason == "cancelled" and cancelled.generated == reference[:len(cancelled.generated)]
    assert len(cancelled.generated) < 30
    assert failing.finish_reason == "error" and "guard exploded" in str(failing.error)
    assert broken.finish_reason == "error" and broken.generated == []
    assert fast_runner.decoder.rows == 0


@pytest.mark.slow
def test_slots_are_reused_without_growth(fast_runner):
    decoder = fast_runner.decoder
    pointers = [t.data_ptr() for t in decoder.keys + decoder.values]
    gc.collect()  # threads of earlier tests' objects that only a collection frees go now, not mid-test
    threads_before = threading.active_count()
    for round_ in range(6):  # 24 requests through the slots, in overlapping groups
        pages = ["small", "wide", "tall", "small"]
        requests = [_request(fast_runner, p, 3 + (round_ + i) % 4) for i, p in enumerate(pages)]
        _run_joined(fast_runner, requests, [0, 1, 1, 2])
        assert all(r.finish_reason == "length" for r in requests)
        assert decoder.rows == 0
    assert [t.data_ptr() for t in decoder.keys + decoder.values] == pointers
    assert threading.active_count() == threads_before
    assert not [t for t in threading.enumerate() if t.name == "dots-ocr-generate" and t.is_alive()]
    assert sum(t.name == "dots-ocr-fast-decode" for t in threading.enumerate()) >= 1


def test_remove_moves_the_last_rows_into_the_holes(plain_runner):
    decoder = StaticDecoder(plain_runner.model, 512, slots=4, compile=False, kv_chunk=64)
    try:
        with torch.inference_mode():
            for page in ("small", "wide", "tall", "small"):
                inputs = plain_runner.processor.page_inputs(PAGES[page], "prompt_ocr").tensors
                handle, _ = decoder.prefill({k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw")},
                                            {})
                decoder.add(handle)
            lengths = list(decoder.lengths)
            rows = [decoder.keys[0][i, :, :n].clone() for i, n in enumerate(lengths)]
            assert decoder.remove([0, 2]) == [3, 1]  # row 3 fills hole 0; row 1 stays
            assert decoder.lengths == [lengths[3], lengths[1]]
            assert torch.equal(decoder.keys[0][0, :, :lengths[3]], rows[3])
            assert torch.equal(decoder.keys[0][1, :, :lengths[1]], rows[1])
            assert decoder.remove([1]) == [0]
            assert decoder.remove([0]) == [] and decoder.rows == 0
            with pytest.raises(RuntimeError, match="slots"):
                for _ in range(5):
                    decoder.add(handle)
    finally:
        decoder.close()


def test_a_request_too_long_for_the_cache_fails_alone(plain_runner):
    decoder = StaticDecoder(plain_runner.model, 256, slots=2, compile=False, kv_chunk=64)
    small = ModelRunner.from_model(plain_runner.model, plain_runner.processor, decoder=decoder, max_batch_size=2)
    try:
        with pytest.raises(GenerationInputError, match="256 tokens"):
            small.generate(PAGES["small"], "prompt_ocr", temperature=0, max_new_tokens=400)
        assert _alone(small, "small", 20, ignore_eos=True) == _alone(plain_runner, "small", 20, ignore_eos=True)
    finally:
        decoder.close()


# -- compile ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_step_one_graph_per_batch_bucket_and_no_recompiles(plain_runner):
    # aot_eager also runs the float32-output matmul layout that CUDA uses (emulated on CPU)
    decoder = StaticDecoder(plain_runner.model, 512, slots=2, compile=True, backend="aot_eager", kv_chunk=64,
                            score_precision="emulate")
    compiled = ModelRunner.from_model(plain_runner.model, plain_runner.processor, decoder=decoder, max_batch_size=2)
    try:
        assert decoder.batch_buckets == (1, 2) and decoder.kv_buckets == (128, 256, 512)
        before = dynamo_compile_count()
        decoder.warmup()
        assert decoder.warmed_up and decoder.compiled
        assert dynamo_compile_count() - before == len(decoder.batch_buckets)  # every KV bucket shares one graph
        before = dynamo_compile_count()
        plan = [("tall", 24, 0), ("small", 8, 2)]
        requests = _run_joined(compiled, [_request(compiled, p, n) for p, n, _ in plan], [j for _, _, j in plan])
        for request, (page, n, _) in zip(requests, plan):
            assert request.generated == _alone(plain_runner, page, n, ignore_eos=True)[0]
        assert dynamo_compile_count() - before == 0, "the decode step recompiled"
    finally:
        decoder.close()


# -- pieces ------------------------------------------------------------------------------------------


def test_buckets_and_memory_arithmetic():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert kv_buckets(39424, 512) == (1024, 2048, 4096, 8192, 16384, 32768, 39424)
    assert kv_buckets(512, 512) == (512,)
    assert slots_that_fit(10, 105, 20) == 8
    assert slots_that_fit(10, 5, 20) == 0


def test_too_many_slots_for_free_gpu_memory_say_how_many_fit(plain_runner, monkeypatch):
    decoder = StaticDecoder(plain_runner.model, 512, slots=4, compile=False)
    try:
        per_slot = decoder.bytes_per_slot
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2.5 * per_slot) + 2**30, 2**40))
        with pytest.raises(RuntimeError, match=r"2 slots would fit\. Lower --max-batch-size to 2"):
            decoder._check_memory(1.0)
        decoder.slots = 2
        decoder._check_memory(1.0)  # fits
    finally:
        decoder.close()


def test_fp32_out_is_not_used_on_cpu_float32(fast_runner):
    assert not fp32_out_supported(torch.device("cpu"), torch.float32)
    assert fast_runner.decoder.score_precision == "native"


def test_decode_attention_matches_sdpa():
    torch.manual_seed(0)
    q_heads, kv_heads, dim, length, valid = 12, 2, 16, 64, 37
    query = torch.randn(3, q_heads, 1, dim)
    key = torch.randn(3, kv_heads, length, dim)
    value = torch.randn(3, kv_heads, length, dim)
    valid_rows = torch.tensor([valid, length, 5])  # each row its own length
    mask = (torch.arange(length) < valid_rows[:, None]).view(3, 1, 1, length)

    class Module:
        num_key_value_groups = q_heads // kv_heads
        is_causal = True

    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[i:i + 1], key[i:i + 1, :, :n], value[i:i + 1, :, :n], enable_gqa=True).transpose(1, 2)
        for i, n in enumerate(valid_rows.tolist())])
    for precision in ("native", "emulate"):  # "emulate": the CUDA float32-output layout, on CPU
        for chunk in (16, 64, 0):  # four chunks, one chunk, no chunking
            out, _ = decode_attention(Module(), query, key, value, mask, scaling=dim ** -0.5, kv_chunk=chunk,
                                      score_precision=precision)
            assert out.shape == (3, 1, q_heads, dim)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    additive = torch.zeros(3, 1, 1, length).masked_fill(~mask, float("-inf"))
    out, _ = decode_attention(Module(), query, key, value, additive, kv_chunk=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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


# -- the runner on the fast path ---------------------------------------------------------------------


def test_sampling_runs_on_the_fast_path(fast_runner, page_image):
    result = fast_runner.generate(page_image, "prompt_ocr", temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3)
    again = fast_runner.generate(page_image, "prompt_ocr", temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3)
    assert result.finish_reason in ("eos", "length")
    assert 1 <= result.stats.new_tokens <= 16
    assert result.text == again.text  # a seed makes a sampled answer repeatable


@pytest.mark.slow
def test_runner_compile_on_cpu_streaming_equals_plain(tiny_ckpt, runner, page_image):
    fast = ModelRunner(tiny_ckpt, device="cpu", dtype="float32", compile=True, max_new_tokens_limit=512).load()
    try:
        assert fast.fast_path and fast.decoder is not None and fast.decoder.warmed_up
        assert fast.decoder.slots == 1 and fast.decoder.batch_buckets == (1,)
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
    eos = sorted(fast_runner.generator.eos_ids)[-1]
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
    assert fast_runner.decoder.rows == 0
    assert fast_runner.generate(page_image, "prompt_ocr", temperature=0, max_new_tokens=3).stats.new_tokens >= 1


# -- the benchmarks, CI-sized --------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_http_stub_times_the_http_and_image_path(tmp_path):
    """--http-stub starts server.py (waitress) with an instant generate and times the rest."""
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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_bench_throughput_prints_a_table_and_a_json_line(tmp_path, mode):
    """The throughput benchmark, CI-sized: the real app in a server process, 4 pages at batch 1
    and 2, streamed and plain."""
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_throughput.py"), "--demo", "--pages", "4",
           "--batch-sizes", "1,2", "--new-tokens", "6", "--json-out", str(out), mode,
           "--server-arg=--torch-threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(out.read_text()) == result
    assert lines[0].startswith("machine:") and "batch" in proc.stdout and "tok/s" in proc.stdout
    assert "batch 4 / batch 1" in proc.stdout
    assert result["batch_sizes"] == [1, 2] and result["server_max_batch_size"] == 2
    for key in ("cpu", "cores", "torch", "device"):
        assert key in result["machine"], key
    assert [level["batch_size"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert set(level) >= {"batch_size", "pages", "wall_s", "pages_per_s", "tok_per_s", "latency_p50_s",
                              "latency_p95_s", "ttft_p50_s", "max_gap_s", "peak_rss_gib", "all_fixed_length"}
        assert level["pages"] == 4 and level["new_tokens_total"] == 24 and level["all_fixed_length"] is True
        assert level["ttft_p50_s"] > 0 and (level["max_gap_s"] is not None) is (mode == "--stream")
    assert result["stream"] is (mode == "--stream")
    assert ("streamed (NDJSON)" if mode == "--stream" else "plain JSON") in lines[1]
