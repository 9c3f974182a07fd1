"""A tiny, randomly initialised vision-language model for plumbing tests and demos.

LLaVA-shaped (CLIP vision tower + Llama text model), a byte-level tokenizer and a processor with a
chat template; about 1 MB, built offline in well under a second. It loads through exactly the
code path a real model takes (``AutoProcessor`` + ``AutoModelForImageTextToText``), so everything
around the model is exercised for real. Its answers are noise: it has never been trained.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MARKER", "build_tiny_model"]

MARKER = "imsight_test_model"  # a config key that says "random weights, answers are noise"

_IMAGE_SIZE, _PATCH = 32, 8  # (32 / 8) ** 2 = 16 image tokens per image
_HIDDEN = 64  # a multiple of 64 keeps bitsandbytes' 4-bit kernels usable on CPU
_SPECIALS = ["<|endoftext|>", "<|pad|>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_README = """imsight plumbing test model
===========================
Randomly initialised weights: every answer is noise. It exists so that the daemon, the
tests and `imsight demo` run the real loading and generation code without downloading a model.
Point [engine] model_path at a real model directory for real answers.
"""


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny model, its processor and a README to ``out_dir``; return ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    try:  # transformers 5.x splits image processors into torchvision and PIL backends
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor  # type: ignore[assignment]

    hf_logging.disable_progress_bar()
    # Byte-level BPE without merges: 256 byte tokens, so any text round-trips.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIALS})

    processor = LlavaProcessor(
        image_processor=ImageProcessor(
            size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",  # drop the CLS token ...
        num_additional_image_tokens=1,  # ... that CLIP adds
        image_token="<image>",
        chat_template=_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=_HIDDEN, intermediate_size=2 * _HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            image_size=_IMAGE_SIZE, patch_size=_PATCH, projection_dim=_HIDDEN,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=_HIDDEN, intermediate_size=2 * _HIDDEN,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),  # type: ignore[call-arg]
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    setattr(config, MARKER, True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "README.txt").write_text(_README, "utf-8")
    return out_dir
