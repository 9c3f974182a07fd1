"""A question's KV moved between the slots, kept as a prefix and handed to a cache, with a copy for all
layers at once instead of one a layer (what a question costs the engine thread when it is seated)."""

from __future__ import annotations

import torch

from core.decode_loop import SlotKV
from core.kv_cache import copied, holding

LAYERS, HEADS, DIM = 3, 2, 8


def _question(length: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A prefilled question's KV as a cache holds it: ``(keys, values)`` a layer, batch of one."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, HEADS, length, DIM, generator=generator),
             torch.randn(1, HEADS, length, DIM, generator=generator)) for _ in range(LAYERS)]


def test_a_row_placed_moved_and_copied_out_keeps_every_layer_s_kv():
    kv = SlotKV(LAYERS, 3, HEADS, DIM, 32, dtype=torch.float32, device="cpu")
    first, second = _question(20, 1), _question(12, 2)
    kv.place(2, first, 20)
    kv.place(kv.staging, second, 12)
    kv.move(kv.staging, 0, 12)
    kv.move(2, 1, 20)
    for row, question, length in ((0, second, 12), (1, first, 20)):
        assert int(kv.positions[row]) == length
        for (keys, values), k, v in zip(question, kv.keys, kv.values, strict=True):
            assert torch.equal(k[row, :, :length], keys[0]) and torch.equal(v[row, :, :length], values[0])
            assert not k[row, :, length:].any()  # nothing written past the question's tokens
    kept = kv.prefix(1, 20)
    kv.place(1, second, 12)  # the row is reused: what was kept out of it stays
    for (keys, values), (k, v) in zip(first, kept, strict=True):
        assert k.shape == (1, HEADS, 20, DIM) and torch.equal(k, keys) and torch.equal(v, values)


def test_a_cache_holding_a_question_takes_its_tensors_and_a_sliding_window_keeps_its_last_tokens():
    from transformers import DynamicCache, MistralConfig

    from core.fused_layers import prefill_cache

    question = _question(10, 3)
    config = MistralConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                           num_key_value_heads=HEADS, intermediate_size=64, vocab_size=50, sliding_window=None)
    plain = holding(prefill_cache(config), question)
    assert plain.get_seq_length() == 10
    assert all(layer.keys is keys and layer.values is values  # no copy made
               for layer, (keys, values) in zip(plain.layers, question, strict=True))
    config.sliding_window = 4
    windowed = holding(DynamicCache(config=config), question)
    for layer, (keys, _values) in zip(windowed.layers, question, strict=True):
        kept = layer.keys.shape[2]
        assert kept < 10 and torch.equal(layer.keys, keys[:, :, -kept:])  # what its own update keeps


def test_a_copy_of_a_batch_s_row_pins_nothing_of_the_batch():
    batch = _question(16, 4)
    row = [(keys[:, :, 6:], values[:, :, 6:]) for keys, values in batch]  # one row's tokens: views
    copy = copied(row)
    sources = {tensor.untyped_storage().data_ptr() for layer in batch for tensor in layer}
    for (keys, values), (k, v) in zip(row, copy, strict=True):
        assert torch.equal(k, keys) and torch.equal(v, values)
        assert k.untyped_storage().data_ptr() not in sources and v.untyped_storage().data_ptr() not in sources
    narrow, wide = torch.ones(1, 1, 3, 2), torch.ones(1, 2, 3, 2)
    uneven = copied([(narrow, narrow), (wide, wide)])
    assert [k.shape[1] for k, _ in uneven] == [1, 2]  # layers of different shapes: copied one by one
