"""Keys against an independent computation (docs/design.md §1).

For every family, both padding sides and tokenizers with and without BOS: k_e, k_e_o and the
module outputs at the subject's last token, against a forward hook of this suite on each
unpadded single prompt, the subject's last token found from the offset mapping of the plain text
(tests/engine_reference.py). Tolerance: absolute 1e-5 (float32 forward passes of the same numbers,
batched and padded versus alone).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_reference import (
    DARRIEUX,
    EDITED,
    EIFFEL,
    HAND_TEMPLATES,
    HIDDEN,
    INTERMEDIATE,
    module_apply64,
    reference_keys,
)
from tiny_models import FAMILIES

from rrome.engine.keys import compute_keys, generate_templates


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_match_independent_hook(
    family: str, padding_side: str, bos: bool, tiny_loaded: Callable[..., Any]
) -> None:
    model, tok, adapter = tiny_loaded(family, padding_side, bos)
    template, layout = EDITED[family]
    assert adapter.layout == layout
    assert tok.padding_side == padding_side
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == bos
    templates = generate_templates(model, tok, lengths=((3, 5),)) + HAND_TEMPLATES
    assert templates[0] == "{}" and len(templates) == 1 + 5 + len(HAND_TEMPLATES)
    for layer in (0, 1):
        name = template.format(layer)
        assert adapter.module_name(layer) == name
        for request in (DARRIEUX, EIFFEL):
            keys = compute_keys(model, tok, name, request, templates)
            assert keys.k_e.shape == keys.k_e_o.shape == (INTERMEDIATE,)
            assert keys.w_k_e.shape == keys.w_k_e_o.shape == (HIDDEN,)
            ref_k, ref_v = reference_keys(model, tok, name, request, templates)
            # Absolute 1e-5: the same float32 computation, batched and padded versus alone.
            torch.testing.assert_close(keys.k_e_o.double(), ref_k[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.w_k_e_o.double(), ref_v[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.k_e.double(), torch.stack(ref_k).mean(0), atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.w_k_e.double(), torch.stack(ref_v).mean(0), atol=1e-5, rtol=0)
            # The module is affine: the mean output is the output at the mean key.
            module = model.get_submodule(name)
            torch.testing.assert_close(keys.w_k_e.double(), module_apply64(module, layout, keys.k_e), atol=1e-5, rtol=0)
            # The templates do change the key (otherwise the comparison above proves little). Not
            # at layer 0 of GPT-J / NeoX: their parallel MLP sees only the token's own embedding.
            if layer == 1:
                assert float((keys.k_e - keys.k_e_o).norm()) > 1e-3 * float(keys.k_e_o.norm())


def test_templates_cache_generates_once_then_reads(
    tiny_loaded: Callable[..., Any], private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call generates and writes the file; the second reads it and generates nothing.
    Another seed or other lengths are other files."""
    import rrome.engine.keys as keys_mod

    monkeypatch.delenv("RROME_NO_TEMPLATE_CACHE")
    model, tok, _ = tiny_loaded("llama", "right")
    lengths = ((3, 5),)
    first = keys_mod.cached_templates("k" * 16, model, tok, seed=0, lengths=lengths)
    assert first == generate_templates(model, tok, seed=0, lengths=lengths)
    path = keys_mod.templates_path("k" * 16, seed=0, lengths=lengths, top_k=5, device="cpu", dtype="float32")
    assert path.parent == private_cache / "stats" / ("k" * 16) and path.is_file()

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("generated again")

    monkeypatch.setattr(keys_mod, "generate_templates", forbidden)
    assert keys_mod.cached_templates("k" * 16, model, tok, seed=0, lengths=lengths) == first
    with pytest.raises(AssertionError, match="generated again"):
        keys_mod.cached_templates("k" * 16, model, tok, seed=1, lengths=lengths)
    with pytest.raises(AssertionError, match="generated again"):
        keys_mod.cached_templates("k" * 16, model, tok, seed=0, lengths=((4, 5),))
    # No key (or the variable set): generated every time, nothing written.
    with pytest.raises(AssertionError, match="generated again"):
        keys_mod.cached_templates(None, model, tok, seed=0, lengths=lengths)
    monkeypatch.setenv("RROME_NO_TEMPLATE_CACHE", "1")
    with pytest.raises(AssertionError, match="generated again"):
        keys_mod.cached_templates("k" * 16, model, tok, seed=0, lengths=lengths)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"version": 1, "templates": ["{}"]}',  # too few
        b'{"version": 2, "templates": ["{}", "a. {}", "b. {}", "c. {}", "d. {}", "e. {}"]}',
        b'{"version": 1, "templates": ["{}", "a. {}", "b. {}", "c. {}", "d. {}", "e {} f. {}"]}',
        b'{"version": 1, "templates": ["{}", "a. {}", "b. {}", "c. {}", "d. {}", 5]}',
    ],
    ids=["garbage", "list", "short", "version", "two-slots", "not-text"],
)
def test_templates_cache_rejects_a_bad_file(
    content: bytes,
    tiny_loaded: Callable[..., Any],
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache file that is not what this version writes is ignored with a warning naming it,
    and replaced by freshly generated templates."""
    import rrome.engine.keys as keys_mod

    monkeypatch.delenv("RROME_NO_TEMPLATE_CACHE")
    model, tok, _ = tiny_loaded("gpt2", "right")
    lengths = ((3, 5),)
    path = keys_mod.templates_path("b" * 16, seed=0, lengths=lengths, top_k=5, device="cpu", dtype="float32")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level("WARNING", logger="rrome.engine.keys"):
        got = keys_mod.cached_templates("b" * 16, model, tok, seed=0, lengths=lengths)
    assert got == generate_templates(model, tok, seed=0, lengths=lengths)
    assert str(path) in caplog.text
    assert keys_mod._read_templates(path, len(got)) == got
