"""What prefilling questions that arrive together in one batch saves, through the engine's own batching
(core/prefill_batch.py; measured before the engine did it, kept to check it on other models and GPUs).

One after another (as the engine prefilled first questions until the ninth step) is what 8 chats asking
at once waited on (bench/RESULTS.md, seventh and eighth steps). Here the
loaded model (imsight's own loading, any quantization) prefills N screenshot questions one after
another and then as one batch (``left_padded``, ``prefill_together``), both eagerly, with the vision
encoder: milliseconds each, and whether each question's first token is the same both ways (the batch's
padding, attention mask and per-row M-RoPE positions).

    python bench/prefill_batching.py --model-dir /path/to/glm-9b [--quantization int4]
    python bench/prefill_batching.py --quick   # the tiny test model on the CPU (the tests run it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from screens import screenshot_image

from core.engine import PreparedImage
from core.fused_layers import prefill_cache
from core.kv_cache import cache_keyword
from core.model_files import resolve
from core.model_loading import LoadedModel, load
from core.prefill_batch import left_padded, pad_token, prefill_together, uses_mrope
from core.prompt_inputs import chat_messages, eos_ids

QUESTION = "What does the error in this screenshot mean, and how do I fix it?"


def rendered(loaded: LoadedModel, conversation: Any) -> dict[str, Any]:
    """One question's inputs, as the engine renders them, on the model's device."""
    inputs = dict(loaded.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt"))
    inputs.pop("token_type_ids", None)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.pixel_dtype)
    return {key: value.to(loaded.model.device) for key, value in inputs.items()}


def alone(loaded: LoadedModel, inputs: dict[str, Any], mrope: bool) -> int:
    """The first token of one question's own prefill."""
    import torch

    if mrope:
        loaded.model.model.rope_deltas = None  # worked out anew from this prompt
    with torch.inference_mode():
        out = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax())


def together(loaded: LoadedModel, batch: dict[str, Any], mrope: bool) -> list[int]:
    """Each question's first token, prefilled in one batch as the engine does."""
    import torch

    model = loaded.model
    with torch.inference_mode():
        rows = prefill_together(model, batch, prefill_cache(model.config), cache_keyword=cache_keyword(model),
                                mrope=mrope)
    return [row.first for row in rows]


def seconds(work: Any, reps: int) -> float:
    import torch

    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--batches", default="2,4,8")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the tiny test model on the CPU, seconds")
    args = parser.parse_args()
    if args.quick:
        import tempfile

        from core.tiny_model import build_tiny_model

        work = tempfile.TemporaryDirectory()  # removed when the process ends
        args.model_dir = build_tiny_model(Path(work.name) / "tiny")
        args.batches, args.reps = "2", 1
    if args.model_dir is None:
        parser.error("--model-dir is needed (or --quick)")
    loaded = load(resolve("bench", args.model_dir, allow_download=False), quantization=args.quantization)
    mrope = uses_mrope(loaded.model)
    pad_id = pad_token(loaded.processor.tokenizer, eos_ids(loaded.model))
    print(f"{args.model_dir.name} on {loaded.device}, quantization {loaded.mode}")
    for n in (int(b) for b in args.batches.split(",")):
        singles = [rendered(loaded, chat_messages([PreparedImage(f"s{i}", screenshot_image(i))], [],
                                                  f"{QUESTION} ({i})")) for i in range(n)]
        batch = left_padded(singles, pad_id)
        assert batch is not None
        firsts = [alone(loaded, inputs, mrope) for inputs in singles]
        batch_firsts = together(loaded, batch, mrope)
        one_by_one = seconds(lambda singles=singles: [alone(loaded, s, mrope) for s in singles], args.reps)
        batched = seconds(lambda batch=batch: together(loaded, batch, mrope), args.reps)
        agree = sum(a == b for a, b in zip(firsts, batch_firsts, strict=True))
        longest = max(int(inputs["input_ids"].shape[1]) for inputs in singles)
        print(f"{n} questions (up to {longest} tokens each): one after another "
              f"{1e3 * one_by_one:.1f} ms, in one batch {1e3 * batched:.1f} ms ({batched / one_by_one:.2f}x); "
              f"first tokens the same both ways: {agree} of {n}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
