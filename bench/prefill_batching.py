"""What prefilling questions that arrive together in one batch saves (measured before the engine
did it, core/prefill_batch.py; kept to check it on other models and GPUs).

One after another (as the engine prefilled first questions until the ninth step) is what 8 chats asking
at once waited on (bench/RESULTS.md, seventh and eighth steps). Here the
loaded model (imsight's own loading, any quantization) prefills N screenshot questions one after
another and then as one left-padded batch, both eagerly, with the vision encoder: milliseconds each,
and whether each question's first token is the same both ways (the batch's padding, attention mask
and per-row M-RoPE positions as transformers computes them).

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
from core.model_files import resolve
from core.model_loading import LoadedModel, load
from core.prompt_inputs import chat_messages

QUESTION = "What does the error in this screenshot mean, and how do I fix it?"


def rendered(loaded: LoadedModel, conversations: list[Any]) -> Any:
    """The processor's batch for ``conversations`` (left-padded), on the model's device."""
    inputs = loaded.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt",
                                                  processor_kwargs={"padding": True})
    inputs.pop("token_type_ids", None)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.pixel_dtype)
    return inputs.to(loaded.model.device)


def first_tokens(loaded: LoadedModel, inputs: Any) -> list[int]:
    import torch

    with torch.inference_mode():
        out = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    return [int(t) for t in out.logits[:, -1].argmax(-1)]


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
    loaded.processor.tokenizer.padding_side = "left"  # the last position of every row is its own last token
    print(f"{args.model_dir.name} on {loaded.device}, quantization {loaded.mode}")
    for n in (int(b) for b in args.batches.split(",")):
        conversations = [chat_messages([PreparedImage(f"s{i}", screenshot_image(i))], [], f"{QUESTION} ({i})")
                         for i in range(n)]
        singles = [rendered(loaded, [c]) for c in conversations]
        batch = rendered(loaded, conversations)
        alone = [first_tokens(loaded, inputs)[0] for inputs in singles]
        together = first_tokens(loaded, batch)
        one_by_one = seconds(lambda singles=singles: [first_tokens(loaded, s) for s in singles], args.reps)
        batched = seconds(lambda batch=batch: first_tokens(loaded, batch), args.reps)
        agree = sum(a == b for a, b in zip(alone, together, strict=True))
        print(f"{n} questions ({int(batch['input_ids'].shape[1])} tokens a row): one after another "
              f"{1e3 * one_by_one:.1f} ms, in one batch {1e3 * batched:.1f} ms ({batched / one_by_one:.2f}x); "
              f"first tokens the same both ways: {agree} of {n}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
