"""The Triton kernels, run by Triton's interpreter on the CPU (on a GPU they run compiled).

``core.int4_unpack_gpu`` unpacks int4 weights for every prefill on a GPU; ``bench/int4_batched_matmul.py``
and ``bench/int4_planes_matmul.py`` are experiments kept for the next try. They compute from packed
layouts (tinygemm's, and the second try's own) with index arithmetic of their own, which is what
these tests check: on the GPU a wrong index reads the right bytes in the wrong order and still looks
like a weight. ``core.split_kv_attention`` is every decode
step's attention on a GPU: checked against SDPA, and inside the engine against bare ``generate()``.
``core.decoder_kernels`` are GLM-4V's decoder layers between their products on a GPU (``core.glm_decoder``):
checked against the eager ops, and in a tiny GLM against transformers' layers.
The interpreter decides when a kernel is defined (``TRITON_INTERPRET``), so each check runs in a
fresh interpreter process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(script: str) -> str:
    path = os.pathsep.join(str(p) for p in (ROOT, ROOT / "bench", ROOT / "tests"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_triton_unpack_writes_what_the_torch_ops_do_at_every_tiling() -> None:
    out = run_interpreted("""
        import torch
        from core.int4_weights import dequantize, pack, quantize
        from core.int4_unpack_gpu import dequantize_gpu

        torch.manual_seed(0)
        for tiles, group, n, k in [(2, 32, 16, 64), (4, 64, 24, 128), (8, 128, 16, 256), (8, 32, 8, 384)]:
            q, scales_zeros = quantize(torch.randn(n, k), group)
            packed = pack(q, tiles)
            ref = dequantize(packed, scales_zeros, group, torch.float32)
            got = dequantize_gpu(packed, scales_zeros, group, torch.float32)
            assert got.shape == ref.shape, (got.shape, ref.shape)
            assert torch.allclose(got, ref, atol=1e-5), (tiles, group, (got - ref).abs().max())
            if n > 8:  # a slice of the outputs, its scales a view of the whole weight's (a prefill's way)
                part = slice(8, n)
                assert not scales_zeros[:, part].is_contiguous()
                got = dequantize_gpu(packed[1:], scales_zeros[:, part], group, torch.float32)
                assert torch.allclose(got, ref[part], atol=1e-5), (tiles, group, (got - ref[part]).abs().max())
                print("sliced", tiles, group)
            print("unpacked", tiles, group)
    """)
    assert out.count("unpacked") == 4 and out.count("sliced") == 3


def test_the_batched_int4_matmul_computes_the_dequantized_product() -> None:
    out = run_interpreted("""
        import torch
        from core.int4_weights import dequantize, pack, quantize
        from int4_batched_matmul import MatmulConfig, config_for, int4_matmul, supports

        torch.manual_seed(0)
        checked = 0
        for tiles, n, k in [(2, 48, 96), (8, 96, 384)]:  # (small and few: the interpreter is slow)
            q, scales_zeros = quantize(torch.randn(n, k), tiles * 16)
            packed = pack(q, tiles)
            assert supports(packed, scales_zeros, tiles * 16)
            weight = dequantize(packed, scales_zeros, tiles * 16, torch.float32)
            for rows in (1, 13):  # one row, and a part of a 16-row tile
                x = torch.randn(rows, k)
                ref = x @ weight.t()
                # more splits than k-tiles too: those programs own no inputs and must add nothing
                for config in (MatmulConfig(16, 1, 4, 2), MatmulConfig(16, 3, 4, 2), MatmulConfig(16, 3, 4, 2, 1),
                               config_for(n, k)):
                    got = int4_matmul(x, packed, scales_zeros, config)
                    assert got.shape == (rows, n)
                    error = ((got - ref).abs().max() / ref.abs().max()).item()
                    assert error < 1e-5, (tiles, rows, config, error)
                    checked += 1
        print("checked", checked)
    """)
    assert "checked 16" in out


def test_the_nibble_plane_kernel_multiplies_as_the_dequantized_weight_does():
    """``bench/int4_planes_matmul.py``, the second try (a layout chosen for Triton): its packing read
    back, and its product against the dequantized weight over rows 1..16, split and not."""
    out = run_interpreted("""
        import torch
        from core.int4_weights import quantize
        from int4_planes_matmul import Launch, int4_matmul, launch_for, pack_planes, unpack_planes

        torch.manual_seed(0)
        checked = 0
        for n, k in [(64, 256), (48, 384)]:  # (few: the interpreter is slow)
            q, scales_zeros = quantize(torch.randn(n, k), 128)
            planes = pack_planes(q, 128)
            assert planes.shape == (k // 8, n) and torch.equal(unpack_planes(planes, 128), q)
            scales = scales_zeros[..., 0].t().repeat_interleave(128, 1)
            zeros = scales_zeros[..., 1].t().repeat_interleave(128, 1)
            weight = (q.float() - 8) * scales + zeros
            for rows in (1, 13):  # one row, and a part of a 16-row tile
                x = torch.randn(rows, k)
                ref = x @ weight.t()
                # more splits than groups too: those programs own no inputs and must add nothing
                for launch in (Launch(16, 1, 4, 2), Launch(16, 4, 4, 2), launch_for(n, k, 128)):
                    got = int4_matmul(x, planes, scales_zeros, 128, launch)
                    assert got.shape == (rows, n)
                    error = ((got - ref).abs().max() / ref.abs().max()).item()
                    assert error < 1e-5, (n, k, rows, launch, error)
                    checked += 1
        print("checked", checked)
    """)
    assert "checked 12" in out


def test_split_kv_attention_computes_what_sdpa_does() -> None:
    out = run_interpreted("""
        import torch
        import core.split_kv_attention as kernel
        from core.split_kv_attention import split_kv_attention
        from core.step_attention import fits

        torch.manual_seed(0)
        checked = 0
        # (rows, query heads, K/V heads, dim, span): grouped heads padded to 16 and not; one row and one
        # head, so that the span is split (4 programs under the interpreter); spans off the block size.
        for rows, heads, kv_heads, dim, span in [(1, 32, 2, 128, 300), (3, 2, 1, 32, 512), (1, 4, 1, 64, 700),
                                                 (2, 8, 8, 16, 65)]:
            # Views into a slot cache, as a decode step gets them: rows and positions of a bigger tensor.
            cache_k, cache_v = torch.randn(2, rows + 2, kv_heads, span + 50, dim).unbind(0)
            key, value = cache_k[1:rows + 1, :, :span], cache_v[1:rows + 1, :, :span]
            query = torch.randn(rows, heads, 1, dim)
            everything, some, one = torch.full((rows,), span), torch.randint(1, span + 1, (rows,)), torch.ones(rows)
            for lengths in (everything, some, one):
                mask = (torch.arange(span)[None, :] < lengths[:, None])[:, None, None, :]
                assert fits(query, key, value, mask, dropout=0.0, scaling=0.1)
                got = split_kv_attention(query, key, value, mask, 0.1)
                groups = heads // kv_heads
                ref = torch.nn.functional.scaled_dot_product_attention(
                    query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask,
                    scale=0.1).transpose(1, 2)
                assert got.shape == ref.shape == (rows, 1, heads, dim)
                assert torch.allclose(got, ref, atol=1e-5), (rows, heads, span, (got - ref).abs().max())
                checked += 1
            # What the kernel is not for goes to the model's own attention.
            mask = torch.ones(rows, 1, 1, span, dtype=torch.bool)
            two_tokens = torch.randn(rows, heads, 2, dim)
            assert not fits(two_tokens, key, value, torch.ones(rows, 1, 2, span, dtype=torch.bool))
            assert not fits(query, key, value, mask.float())
            assert not fits(query, key, value, None)
            assert not fits(query, key, value, mask, dropout=0.1)
            assert not fits(query, key, value, mask, softcap=30.0)
        # A long span on a GPU with many programs: at most MAX_SPLITS slices, each over several blocks.
        kernel._programs = lambda device: 1000
        query, key, value = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 5000, 16), torch.randn(1, 1, 5000, 16)
        mask = torch.ones(1, 1, 1, 5000, dtype=torch.bool)
        mask[..., 4321:] = False
        ref = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask).transpose(1, 2)
        assert torch.allclose(split_kv_attention(query, key, value, mask, 16 ** -0.5), ref, atol=1e-5)
        # Installed, it takes the registry's calls as the model makes them (the mask by position or by
        # name) and hands on what is not its own.
        from types import SimpleNamespace
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from core.step_attention import StepAttention

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        installed = StepAttention("sdpa")
        module = SimpleNamespace(num_key_value_groups=4, is_causal=False, training=False)
        query, key, value = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., 10:] = False
        ref = sdpa(module, query, key, value, mask, scaling=0.2, dropout=0.0)[0]
        assert torch.allclose(ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, scaling=0.2)[0], ref,
                              atol=1e-5)
        assert torch.allclose(ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask=mask,
                                                              scaling=0.2)[0], ref, atol=1e-5)
        many = torch.randn(2, 8, 5, 32)
        assert torch.equal(ALL_ATTENTION_FUNCTIONS["sdpa"](module, many, key, value, attention_mask=None)[0],
                           sdpa(module, many, key, value, None)[0])
        # A follow-up's tail: one row's new tokens after its cached ones, each seeing the row up to itself.
        from core import step_attention
        from helpers import recorded
        tail_calls = recorded(step_attention, "tail_attention", lambda *args: args[0].shape[2])
        cache_k, cache_v = torch.randn(2, 3, 2, 60, 32).unbind(0)
        key, value = cache_k[1:2, :, :40], cache_v[1:2, :, :40]  # the slots' row 1, as a tail's forward gets it
        for tokens, cached in ((5, 20), (2, 37), (39, 1)):
            tail = torch.randn(1, 8, tokens, 32)
            sees = torch.arange(40)[None, :] <= cached + torch.arange(tokens)[:, None]
            mask = sees[None, None]
            assert step_attention.fits_tail(tail, key, value, mask)
            ref = sdpa(module, tail, key, value, mask, scaling=0.2)[0]
            installed.tails = False
            assert torch.equal(ALL_ATTENTION_FUNCTIONS["sdpa"](module, tail, key, value, mask, scaling=0.2)[0], ref)
            installed.tails = True
            got = ALL_ATTENTION_FUNCTIONS["sdpa"](module, tail, key, value, mask, scaling=0.2)[0]
            assert got.shape == ref.shape == (1, tokens, 8, 32)
            assert torch.allclose(got, ref, atol=1e-5), (tokens, (got - ref).abs().max())
        assert tail_calls == [5, 2, 39]
        # The check ``install`` makes for the tails, and a kernel that gets the tokens' lines of the mask wrong.
        from core.step_attention import _Probe
        probe = _Probe(8, 2, 32, device=torch.device("cpu"), dtype=torch.float32)
        assert probe.tail_agrees()
        step_attention.tail_attention = lambda query, key, value, mask, scale, own=step_attention.tail_attention: own(
            query, key, value, mask.flip(2), scale)
        assert not probe.tail_agrees()
        # Not a tail: several rows, as many keys as queries (a prompt), past the longest captured tail, no mask.
        square = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
        assert not step_attention.fits_tail(torch.randn(2, 8, 5, 32), cache_k[:2, :, :40], cache_v[:2, :, :40],
                                            torch.ones(2, 1, 5, 40, dtype=torch.bool))
        assert not step_attention.fits_tail(torch.randn(1, 8, 40, 32), key, value, square)
        assert not step_attention.fits_tail(torch.randn(1, 8, 300, 32), torch.randn(1, 2, 400, 32),
                                            torch.randn(1, 2, 400, 32), torch.ones(1, 1, 300, 400, dtype=torch.bool))
        assert not step_attention.fits_tail(tail, key, value, None)
        assert not step_attention.fits_tail(tail, key, value, mask.float())
        installed.remove()
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
        print("checked", checked)
    """)
    assert "checked 12" in out


def test_decode_steps_through_split_kv_attention_answer_as_bare_generate() -> None:
    """The tiny model's engine under the interpreter, where the kernel runs: every decode step's
    attention is the kernel's (several rows at once), and each answer is still bare ``generate()``'s;
    with ``split_kv_attention = false`` in the config, the same answer through SDPA alone."""
    out = run_interpreted("""
        import asyncio, tempfile
        from pathlib import Path
        from PIL import Image
        import core.split_kv_attention as kernel
        from core.answer_text import CUT_NOTE
        from core.engine import GenerationLimits, PreparedImage
        from core.model_files import resolve
        from core.tiny_model import build_tiny_model
        from core.transformers_engine import TransformersEngine
        from helpers import bare_generate, recorded

        rows = recorded(kernel, "split_kv_attention", lambda *args: args[0].shape[0])
        import core.step_attention as step_attention
        # each prompt forward's rows taken causally, unmasked: where each row's tokens start
        starts = recorded(step_attention, "causal_rows", lambda *args, **kwargs: list(args[5]))

        async def answer(engine, images, question, tokens):
            return "".join([c async for c in engine.answer(images, [], question, GenerationLimits(tokens))])

        async def main():
            directory = build_tiny_model(Path(tempfile.mkdtemp()))
            model = resolve("tiny", directory, allow_download=False)
            engine = TransformersEngine(model, device="cpu", max_batch=4, prefix_cache_bytes=0)
            await engine.start()
            try:
                asks = [([PreparedImage(f"i{n}", Image.new("RGB", (64, 48), (40 * n, 90, 200)))], "Q" + "?" * n,
                         10 + 4 * n) for n in range(3)]
                expected = [bare_generate(engine, images, question, tokens) for images, question, tokens in asks]
                from core.fused_layers import decoder_layers
                layers = len(decoder_layers(engine.loaded.model))
                engine._prefill_uncaptured = True  # a first question alone: the stepper's prefill, as on a GPU
                del starts[:]  # (the check at install)
                before = len(rows)
                got = await asyncio.gather(*[answer(engine, *ask) for ask in asks])
                assert len(rows) > before and max(rows) >= 3, rows  # the steps went through it, together
                # Every prompt's attention causal without its mask, in every layer, however they happened to be
                # grouped: one alone from position 0, several left-padded, each row from its own first token.
                stats = engine.stats
                assert starts.count([0]) == layers * stats.slot_prefills, (starts, stats)
                assert len(starts) == layers * (stats.slot_prefills + stats.prefill_batches) > 0, (starts, stats)
                for want, have in zip(expected, got, strict=True):
                    assert have.removesuffix(CUT_NOTE) == want and want, (want, have)
                print("answered", len(got))
            finally:
                await engine.stop()
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original_sdpa  # stopped: the library's own again

            # ``[engine] split_kv_attention = false``: the same answers, through SDPA only.
            from bot.config import parse
            from bot.daemon import build_engine

            config = parse({"storage": {"data_dir": tempfile.mkdtemp()},
                            "engine": {"model_path": str(directory), "device": "cpu", "max_batch": 4,
                                       "prefix_cache_mb": 0, "split_kv_attention": False}}, environ={})
            engine = build_engine(config)
            await engine.start()
            try:
                before = len(rows)
                assert await answer(engine, *asks[0]) == got[0]
                assert len(rows) == before and ALL_ATTENTION_FUNCTIONS["sdpa"] is original_sdpa
            finally:
                await engine.stop()
            print("switched off")

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        original_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        asyncio.run(main())
    """)
    assert "answered 3" in out
    assert "switched off" in out


def test_follow_ups_tails_through_split_kv_attention_answer_as_bare_generate() -> None:
    """The tiny model's engine under the interpreter, follow-ups' tails through the kernel too
    (``StepAttention.tails``, the engine's way): each follow-up's new tokens attend over its cached prefix there,
    and the answer is still bare ``generate()``'s."""
    out = run_interpreted("""
        import asyncio, tempfile
        from pathlib import Path
        from PIL import Image
        import core.step_attention as step_attention
        from core.answer_text import CUT_NOTE
        from core.engine import GenerationLimits, PreparedImage, Turn
        from core.model_files import resolve
        from core.tiny_model import build_tiny_model
        from core.transformers_engine import TransformersEngine
        from helpers import bare_generate, recorded

        tails = recorded(step_attention, "tail_attention", lambda *args: args[0].shape[2])

        async def answer(engine, images, turns, question, tokens):
            text = "".join([c async for c in engine.answer(images, turns, question, GenerationLimits(tokens))])
            return text.removesuffix(CUT_NOTE)

        async def main():
            directory = build_tiny_model(Path(tempfile.mkdtemp()))
            engine = TransformersEngine(resolve("tiny", directory, allow_download=False), device="cpu", max_batch=2)
            await engine.start()
            try:
                assert engine._step_attention is not None and engine._step_attention.tails  # (the engine's way)
                assert tails, "the install check runs the kernel on a tail of its own"
                tails.clear()
                image = PreparedImage("i", Image.new("RGB", (64, 48), (30, 90, 200)))
                first = await answer(engine, [image], [], "What is it?", 8)
                turns = [Turn("user", "What is it?"), Turn("assistant", first)]
                for question in ("And then?", "Why " * 12 + "?"):
                    got = await answer(engine, [image], turns, question, 8)
                    assert got == bare_generate(engine, [image], question, 8, turns) and got, (question, got)
                    turns += [Turn("user", question), Turn("assistant", got)]
                assert engine.stats.prefix_hits == 2, engine.stats
                layers = engine.loaded.model.config.text_config.num_hidden_layers
                # Every layer of each follow-up, at its captured tail size (the second question is longer).
                assert tails == [tails[0]] * layers + [tails[-1]] * layers and tails[0] < tails[-1], tails
                print("follow-ups", len(tails) // layers)
            finally:
                await engine.stop()

        asyncio.run(main())
    """)
    assert "follow-ups 2" in out


def test_glm_decoder_layers_through_the_kernels_compute_what_transformers_layers_do() -> None:
    """Each kernel against the eager ops it replaces (float32: the interpreter's bf16 does not round as a GPU
    does; bench/decoder_kernels.py checks bf16 there); then a tiny GLM-4.1V in int4 with every decoder layer
    through them: the same logits and greedy tokens as with transformers' layers; and a kernel that disagrees
    keeps transformers' layers."""
    out = run_interpreted("""
        import logging
        import torch
        from helpers import tiny_glm
        from core import decoder_kernels, glm_decoder, qkv_projection, text_rotary
        from core.fused_layers import decoder_layers
        from core.text_rotary import _rotated

        torch.manual_seed(0)
        def rms(x, w, eps=1e-5):
            h = x.float()
            return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        x, residual, w, w2 = torch.randn(2, 3, 96), torch.randn(2, 3, 96), torch.randn(96), torch.randn(96)
        assert close(decoder_kernels.rms_norm(x, w, 1e-5), rms(x, w))
        total, normed = decoder_kernels.add_rms_norm(x, residual, w, 1e-5, w2)
        assert close(total, residual + rms(x, w)) and close(normed, rms(residual + rms(x, w), w2))
        assert decoder_kernels.add_rms_norm(x, residual, w, 1e-5)[1] is None
        gate_up = torch.randn(2, 3, 2 * 1500)  # more than a program's share of the gate
        gate, up = gate_up.chunk(2, dim=-1)
        assert close(decoder_kernels.silu_mul(gate_up), up * torch.nn.functional.silu(gate))
        heads, kv_heads, dim = 4, 2, 32
        product = torch.randn(2, 3, (heads + 2 * kv_heads) * dim)
        angles = torch.randn(1, 3, dim // 2)  # one row's positions for both rows: broadcast
        q, k = decoder_kernels.rotated_qk(product, angles.cos(), angles.sin(), heads, kv_heads, dim)
        cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)
        assert close(q, _rotated(product[..., :heads * dim].view(2, 3, heads, dim), cos, sin))
        keys = product[..., heads * dim:(heads + kv_heads) * dim].view(2, 3, kv_heads, dim)
        assert close(k, _rotated(keys, cos, sin))
        print("kernels agree")

        def glm():
            model = tiny_glm()
            text_rotary.install(model)
            assert qkv_projection.install(model) == 2
            return model

        ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(1))
        def run(model):
            with torch.inference_mode():
                tokens = model.generate(input_ids=ids[:1], max_new_tokens=12, do_sample=False)
                return model(input_ids=ids).logits, tokens
        model = glm()
        theirs = run(model)
        assert glm_decoder.install(model) == 2
        assert all(layer.forward.__func__ is glm_decoder.forward for layer in decoder_layers(model))
        ours = run(model)
        assert close(ours[0], theirs[0]), (ours[0] - theirs[0]).abs().max()
        assert torch.equal(ours[1], theirs[1]) and theirs[1].shape[1] > ids.shape[1]
        print("layers agree")
        # transformers' layer takes the cache as ``cache`` and, deprecated, ``past_key_values``: so does this one.
        from transformers import DynamicCache
        layer = decoder_layers(model)[0]
        hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
        angles = torch.randn(1, 5, layer.self_attn.head_dim // 2)
        for keyword in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config.text_config)
            with torch.inference_mode():
                layer(hidden, position_embeddings=(angles.cos(), angles.sin()), **{keyword: cache})
            assert cache.get_seq_length() == 5, keyword
        print("either cache keyword")

        decoder_kernels.silu_mul = lambda gate_up, own=decoder_kernels.silu_mul: own(gate_up) * 1.1
        model = glm()
        logging.basicConfig()
        assert glm_decoder.install(model) == 0
        assert not any("forward" in vars(layer) for layer in decoder_layers(model))
        print("disagreement kept out")
    """)
    assert "kernels agree" in out and "layers agree" in out and "either cache keyword" in out
    assert "disagreement kept out" in out


def test_glm_vision_blocks_through_the_kernels_compute_what_transformers_blocks_do() -> None:
    """The vision encoder's kernels against the eager ops they replace (float32, as above); then a tiny GLM-4.1V's
    vision tower with every block through them: the same features for one image and for two packed together;
    and a kernel that disagrees keeps transformers' blocks."""
    out = run_interpreted("""
        import torch
        from helpers import tiny_glm
        from core import decoder_kernels, glm_vision, vision_attention, vision_kernels
        from core.compiled_vision import vision_blocks
        from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb_vision

        torch.manual_seed(0)
        def rms(x, w, eps=1e-5):
            h = x.float()
            return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        x, residual, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
        total, normed = decoder_kernels.add_rms_norm(x, residual, None, 1e-5, w)  # no norm before the add
        assert torch.equal(total, residual + x) and torch.allclose(normed, rms(residual + x, w), atol=1e-5)
        gate, up = torch.randn(5, 1500), torch.randn(5, 1500)
        assert torch.allclose(decoder_kernels.silu_mul(gate, up), up * torch.nn.functional.silu(gate), atol=1e-5)
        tokens, heads, dim = 7, 3, 32
        product = torch.randn(tokens, 3 * heads * dim)
        angles = torch.randn(tokens, dim // 2).repeat(1, 2)
        q, k = vision_kernels.rotated_halves(product, angles.cos(), angles.sin(), heads, dim)
        parts = product.view(tokens, 3, heads, dim)
        want_q, want_k = apply_rotary_pos_emb_vision(parts[:, 0], parts[:, 1], angles.cos(), angles.sin())
        assert torch.equal(q, want_q) and torch.equal(k, want_k), ((q - want_q).abs().max(), (k - want_k).abs().max())
        print("kernels agree")

        def tower():
            model = tiny_glm()
            assert vision_attention.install(model)
            return model
        grid = torch.tensor([[1, 4, 8], [1, 4, 4]])
        pixels = vision_attention.random_patches(tower().model.visual.config, grid)
        def features(model):
            with torch.inference_mode():
                visual = model.model.visual
                return visual(pixels, grid_thw=grid).pooler_output, visual(pixels[:32], grid_thw=grid[:1]).pooler_output
        model = tower()
        theirs = features(model)
        assert glm_vision.install(model) == 2
        assert all(block.forward.__func__ is glm_vision.forward for block in vision_blocks(model))
        ours = features(model)
        for mine, want in zip(ours, theirs):
            assert torch.allclose(mine, want, rtol=1e-5, atol=1e-6), (mine - want).abs().max()
        print("blocks agree")

        # Turned the other way: what a sign slip in the kernel would do.
        vision_kernels.rotated_halves = lambda product, cos, sin, heads, dim, own=vision_kernels.rotated_halves: own(
            product, cos, -sin, heads, dim)
        model = tower()
        assert glm_vision.install(model) == 0
        assert not any("forward" in vars(block) for block in vision_blocks(model))
        print("disagreement kept out")
    """)
    assert "kernels agree" in out and "blocks agree" in out and "disagreement kept out" in out
