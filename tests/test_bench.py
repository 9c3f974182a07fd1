"""Every script in bench/ runs in its quick mode, so a benchmark that no longer runs fails the tests.

Their figures mean nothing here (2 shared cores, a tiny model or a stand-in engine); what is
checked is that each runs to its end and prints what it is for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "api_overhead.py": (["--quick"], ["daemon cost", "queued question"]),
    "soak.py": (["--quick"], ["lost answers                    0", "duplicated answers              0"]),
    "engine_bench.py": (["--quick"], ["time to first token", "8 at once", "8 at once, 8-token answers",
                                      "(median of 3 rounds: ",
                                      "greedy output equals bare generate()",
                                      "[bf16] started", "[bf16-unfused] started"]),  # (each mode a process)
    "engine_smoke.py": ([], ["cuda available"]),
    "int4_kernels.py": ([], ["cuda available"]),
    "fp8_kernels.py": ([], ["cuda available"]),
    "prefill_batching.py": (["--quick"], ["2 questions", "first tokens the same both ways: 2 of 2"]),
    "attention_kernels.py": ([], ["cuda available"]),
    "daemon_bench.py": (["--quick"], ["one answer", "8 chats within one second", "slowest =",
                                      "first token after",  # (the 8 chats' job log lines)
                                      "daemon log (+"]),  # (each line's seconds after the daemon's spawn)
    "burst_model.py": ([], ["prefill 82 ms, gap 0 ms, 1 piece(s)", "slowest ="]),
    "admission_phases.py": (["--quick", "--rounds", "2", "--ab-causal"],
                            ["not installed here (a CPU)", "round 1: all first tokens after",
                             "all first tokens, median", ": median "]),  # (": median": a phase's line)
    "burst_profile.py": (["--quick", "--by-host", "--steps"],
                         ["== one alone", "== 8 asked 125 ms apart, 64 tokens", "no GPU kernels", "prefill: ",
                          "step graphs: none captured here", "by the engine's phase"]),
    "startup_profile.py": (["--quick"], ["imports done", "the engine's start begins",
                                         "everything captured and compiled after", "the whole start, by kind"]),
    "vision_encoder.py": (["--quick", "--kernels"], ["1 image(s)", "8 image(s)", "same output: True",
                                                     "imsight's blocks, its kernels: largest difference"]),
    "fp8_prefill.py": (["--quick"], ["one layer's linears", "row-wise fp8 error"]),
    "decoder_kernels.py": (["--quick"], ["8 rows:", "rotated_qk: 0 of 1024 differ", "silu_mul: "]),
}


def test_every_bench_script_is_covered():
    # (the int4 experiments: test_triton_kernels)
    helpers = {"stand_in.py", "glm_model.py", "screens.py", "int4_batched_matmul.py", "int4_planes_matmul.py"}
    found = {p.name for p in (ROOT / "bench").glob("*.py")} - helpers
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_in_quick_mode(script, tmp_path):
    args, expected = SCRIPTS[script]
    if script == "engine_bench.py":
        args = [*args, "--work", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, done.stdout[-3000:]


def test_the_bench_model_answers_in_text_its_tokenizer_reads_back_token_for_token():
    """The GPU benches' random GLM model (``bench/glm_model.py``, here its tiny size, without the
    processor that needs torchvision): greedy answers are printable ASCII, never an end token, and a
    follow-up's history holds them as exactly as many tokens as were generated."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from glm_model import _tokenizer, glm_config, speak_ascii
    from transformers import Glm4vForConditionalGeneration

    tokenizer = _tokenizer("tiny")
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration._from_config(glm_config("tiny"), dtype=torch.float32)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    with torch.inference_mode():
        prompt = torch.randint(0, 250, (1, 12))
        before = model.generate(input_ids=prompt, max_new_tokens=40, do_sample=False)[0, 12:].tolist()
        speak_ascii(model, tokenizer)
        after = model.generate(input_ids=prompt, max_new_tokens=40, do_sample=False, eos_token_id=ends)[0, 12:]
    text = tokenizer.decode(after.tolist())
    assert len(after) == 40 and not set(after.tolist()) & set(ends)
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in text), text
    assert tokenizer.encode(text, add_special_tokens=False) == after.tolist()
    assert not all(32 <= ord(ch) < 127 for ch in tokenizer.decode(before))  # random weights alone would not


def test_the_burst_model_takes_turns_as_the_engine_does():
    """``bench/burst_model.py``: a lone answer is its rendering, its prefill and its steps; in a burst the early
    chats wait for the later ones' prefills, the longer the more those hold the GPU, and a gap between
    prefills gives the running answers their steps first."""
    sys.path.insert(0, str(ROOT / "bench"))
    from burst_model import Burst, answer_times

    lone = Burst(prefill_ms=50, chats=1)
    assert answer_times(lone) == [pytest.approx(lone.render_ms + 50 + (lone.tokens - 1) * lone.step_ms)]
    slowest = [max(answer_times(Burst(prefill_ms=p))) for p in (30, 60, 90)]
    assert slowest == sorted(slowest) and slowest[0] < slowest[-1]
    burst = Burst(prefill_ms=82)
    first_chat = [answer_times(burst, gap_ms=gap)[0] for gap in (0, 80)]
    assert first_chat[1] < first_chat[0]


def test_the_burst_profile_sorts_kernels_by_kind_and_finds_the_gpu_s_gaps():
    """``bench/burst_profile.py``'s reading of a profile (the quick run has no GPU kernels to read): kernel
    names as the H200's profiles show them, and busy time as the union of overlapping kernels."""
    sys.path.insert(0, str(ROOT / "bench"))
    from burst_profile import busy_and_gaps, kind

    names = {"triton_red_fused__to_copy_add_int4_mma_mean_mul_pow_rsqrt_view_0": "inductor's fused",
             "triton_poi_fused_add_cat_mul_neg_slice_stack_transpose_unsqueeze_view_2": "inductor's fused",
             "void int4_mma<8, 1, 1, 1, 128, 0>(unsigned short const*, Words const*": "int4 multiplies",
             "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN": "matrix products",
             "_dequantize_block": "int4 unpacking", "_attend_slice": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
             "cutlass::bfloat16_t>>": "attention",
             "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel": "attention",
             "Memcpy HtoD (Pageable -> Device)": "copies",
             "void at::native::(anonymous namespace)::grid_sampler_2d_kernel<float, int>": "other"}
    assert {name: kind(name) for name in names} == names
    busy, gaps = busy_and_gaps([(0, 1000), (500, 1500), (1600, 1700), (3000, 3100)])  # microseconds
    assert busy == pytest.approx(1.7)  # ms: 0-1.5, 1.6-1.7, 3.0-3.1
    assert gaps == [(pytest.approx(1.7), pytest.approx(1.3))]  # 0.1 ms is under GAP_MS
    assert busy_and_gaps([(0, 1000), (1100, 1200)], least_ms=0.05)[1] == [(pytest.approx(1.0), pytest.approx(0.1))]


def test_the_burst_profile_sums_kernels_by_kind_and_name_per_replay():
    sys.path.insert(0, str(ROOT / "bench"))
    from types import SimpleNamespace

    from burst_profile import kernel_tables

    kernels = [SimpleNamespace(name=name, device_time=us) for name, us in
               (("_attend_slice", 300.0), ("_attend_slice", 100.0), ("nvjet_sm90_tst_384x8", 1000.0))]
    by_kind, by_name = kernel_tables(kernels, per=2)  # two replays' kernels: ms a replay
    assert by_kind == {"attention": [pytest.approx(0.2), 2], "matrix products": [pytest.approx(0.5), 1]}
    assert by_name["_attend_slice"] == [pytest.approx(0.2), 2]


def test_the_burst_profile_puts_each_gap_down_to_the_innermost_phase_under_way():
    sys.path.insert(0, str(ROOT / "bench"))
    from burst_profile import gaps_by_host

    phases = [("step", 0.0, 10.0), ("take_tokens", 2.0, 5.0), ("admit_together", 20.0, 30.0)]
    gaps = [(1.0, 0.5), (3.0, 0.25), (4.0, 0.25), (12.0, 2.0), (25.0, 1.0)]  # (start, ms)
    assert gaps_by_host(gaps, phases) == [("(none)", 2.0, 1), ("admit_together", 1.0, 1), ("step", 0.5, 1),
                                          ("take_tokens", 0.5, 2)]
