"""A GLM-4.1V/4.6V-shaped model with random weights, for tests and benchmarks without a download.

``Glm4vForConditionalGeneration`` is the class GLM-4.6V-Flash loads as: M-RoPE positions,
dynamic-resolution images (patch 14, 2x2 merge), ``<|begin_of_image|><|image|>…<|end_of_image|>``.
Needs torchvision (GLM's processor owns a video processor). No GLM tokenizer can be had offline,
so this writes a byte-level one that has GLM's special tokens at GLM's ids; text round-trips, and
the image tokens land where the real processor puts them. Its answers are printable ASCII
(``speak_ascii``), so an answer quoted back in a follow-up takes as many tokens as it was generated in.
``size="9b"`` is the released 9B shape (20.6 GB in bf16); ``size="tiny"`` runs on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from core.tiny_model import MARKER

__all__ = ["build_glm_model", "glm_config", "speak_ascii"]

# GLM-4.1V / 4.6V special tokens and their ids in the released tokenizer.
_SPECIALS = {
    "<|endoftext|>": 151329, "[gMASK]": 151331, "<sop>": 151333, "<|system|>": 151335, "<|user|>": 151336,
    "<|assistant|>": 151337, "<|observation|>": 151338, "<|begin_of_image|>": 151339,
    "<|end_of_image|>": 151340, "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342,
    "<|image|>": 151343, "<|video|>": 151344, "<think>": 151350, "</think>": 151351,
}
_TINY_OFFSET = 151329 - 256  # the tiny vocabulary moves the specials down to just after the bytes
_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def glm_config(size: Literal["9b", "tiny"]) -> Any:
    from transformers import Glm4vConfig

    # As in the released checkpoints: half the head dims rotate, split over (t, h, w) as 8/12/12.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [8, 12, 12] if size == "9b" else [4, 6, 6]}  # sums to a quarter of head_dim
    if size == "9b":
        config = Glm4vConfig(text_config={"rope_parameters": rope})
    else:
        specials = {name: i - _TINY_OFFSET for name, i in _SPECIALS.items()}
        config = Glm4vConfig(
            text_config={"vocab_size": 256 + len(_SPECIALS) + 8, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 64, "max_position_embeddings": 4096, "rope_parameters": rope,
                         "eos_token_id": specials["<|user|>"], "pad_token_id": specials["<|endoftext|>"]},
            vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                           "out_hidden_size": 64},
            image_token_id=specials["<|image|>"], image_start_token_id=specials["<|begin_of_image|>"],
            image_end_token_id=specials["<|end_of_image|>"], video_token_id=specials["<|video|>"],
            video_start_token_id=specials["<|begin_of_video|>"], video_end_token_id=specials["<|end_of_video|>"],
        )
    return config


def tiny_glm(vision_depth: int = 2) -> Any:
    """The tiny shape in memory, random weights (seed 0), float32, for the CPU's tests (no processor)."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    config = glm_config("tiny")
    config.vision_config.depth = vision_depth
    torch.manual_seed(0)
    return Glm4vForConditionalGeneration._from_config(config, dtype=torch.float32).eval()


def build_glm_model(out_dir: Path, size: Literal["9b", "tiny"] = "tiny", *, device: str = "cpu",
                    seed: int = 0) -> Path:
    """Write a random GLM-4.1V-shaped model and a matching processor to ``out_dir``."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    processor = _processor(size)
    config = glm_config(size)
    setattr(config, MARKER, True)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if size == "9b" else torch.float32
    with torch.device(device):
        model = Glm4vForConditionalGeneration._from_config(config, dtype=dtype)
    tokenizer = processor.tokenizer
    speak_ascii(model, tokenizer)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t)
                                            for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def speak_ascii(model: Any, tokenizer: Any) -> None:
    """Only printable ASCII (and line breaks) for answers: the other rows of ``lm_head`` are zero, so
    their logits (0) lose to the largest of ~100 random ones.

    Why: random weights otherwise answer in ``<|unused_N|>`` fillers, ~17 characters each, which this
    byte-level tokenizer reads back one byte a token, so a 64-token answer returned in a follow-up's
    history as ~1,080 tokens (a real tokenizer reads its own text back as about as many tokens as it
    wrote). No end token can win either: every answer runs to its token limit, as before."""
    import torch

    ids = sorted({tokenizer.encode(ch, add_special_tokens=False)[0] for ch in [*map(chr, range(32, 127)), "\n"]})
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            raise ValueError("lm_head is tied to the input embeddings: cannot zero its rows")
        keep = head[ids].clone()
        head.zero_()
        head[ids] = keep


def _tokenizer(size: str) -> Any:
    """A byte-level tokenizer with GLM's special tokens at GLM's ids (fillers in between)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    offset = _TINY_OFFSET if size == "tiny" else 0
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = {name: i - offset for name, i in _SPECIALS.items()}
    top = max(specials.values())
    taken = set(specials.values())
    # Unused filler entries up to the last special id: the ids must be GLM's own.
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), top + 1) if i not in taken})
    vocab.update(specials)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


def _processor(size: str) -> Any:
    from transformers import Glm4vProcessor, Glm4vVideoProcessor

    try:  # transformers >= 5.2x ships a PIL backend: no torchvision needed
        from transformers import Glm4vImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Glm4vImageProcessor as ImageProcessor  # type: ignore[assignment]

    tokenizer = _tokenizer(size)
    image_processor = ImageProcessor(
        # 9B: the released limits; tiny: few patches, so a CPU test stays fast.
        size={"shortest_edge": 12544, "longest_edge": 9633792} if size == "9b"
        else {"shortest_edge": 3136, "longest_edge": 12544},
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    # The video processor is what makes torchvision a must for GLM-4.1V/4.6V (the `gpu` install extra).
    return Glm4vProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          video_processor=Glm4vVideoProcessor(), chat_template=_CHAT_TEMPLATE)
