import pytest
import torch
from conftest import tiny_transformer

from enat_diffusers import ENATReuseState, ENATTransformer2DModel
from enat_diffusers.utils.token_groups import ungroup_tokens


ATOL = 1e-4


@pytest.fixture(scope="module")
def model(converted_fixture_dir):
    return ENATTransformer2DModel.from_pretrained(converted_fixture_dir, subfolder="transformer")


def close(actual, expected):
    return torch.allclose(actual, expected, atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------------------------------------ parity with the original


@torch.no_grad()
def test_forward_without_reuse_matches_original(model, enat_io):
    out = model(enat_io["fwd1.masked_ids"], class_labels=enat_io["fwd1.class_labels"])
    assert out.logits.shape == (4, 16, 32)
    assert close(out.logits, enat_io["fwd1.logits"])
    assert close(out.reuse_state.hidden_states, enat_io["fwd1.feat"])
    assert torch.equal(out.reuse_state.mask, enat_io["fwd1.masking"])


@torch.no_grad()
def test_forward_with_reuse_matches_original_and_reuse_matters(model, enat_io):
    recorded_state = ENATReuseState(hidden_states=enat_io["fwd1.feat"], mask=enat_io["fwd1.masking"])
    out = model(enat_io["fwd2.masked_ids"], class_labels=enat_io["fwd2.class_labels"], reuse_state=recorded_state)
    assert close(out.logits, enat_io["fwd2.logits"])
    assert close(out.reuse_state.hidden_states, enat_io["fwd2.feat"])

    # chaining our own state gives the same
    first = model(enat_io["fwd1.masked_ids"], class_labels=enat_io["fwd1.class_labels"])
    chained = model(
        enat_io["fwd2.masked_ids"], class_labels=enat_io["fwd2.class_labels"], reuse_state=first.reuse_state
    )
    assert close(chained.logits, enat_io["fwd2.logits"])

    plain = model(enat_io["fwd2.masked_ids"], class_labels=enat_io["fwd2.class_labels"])
    assert close(plain.logits, enat_io["fwd2_noprev.logits"])
    assert (plain.logits - out.logits).abs().max() > 0.1  # reuse changes the result


@torch.no_grad()
def test_reused_features_are_prev_proj_of_previous_features(model, enat_io):
    state = ENATReuseState(hidden_states=enat_io["fwd1.feat"], mask=enat_io["fwd1.masking"])
    out = model(enat_io["fwd2.masked_ids"], class_labels=enat_io["fwd2.class_labels"], reuse_state=state)
    was_visible = ~enat_io["fwd1.masking"]
    projected = model.prev_proj(enat_io["fwd1.feat"])
    assert close(out.reuse_state.hidden_states[was_visible], projected[was_visible])


@torch.no_grad()
def test_grid_input_and_tuple_output(model, enat_io):
    ids, labels = enat_io["fwd1.masked_ids"], enat_io["fwd1.class_labels"]
    logits, state = model(ids.reshape(4, 4, 4), class_labels=labels.reshape(4, 1), return_dict=False)
    assert close(logits, enat_io["fwd1.logits"])
    assert isinstance(state, ENATReuseState)


@torch.no_grad()
def test_rows_are_independent(model, enat_io):
    ids, labels = enat_io["fwd1.masked_ids"], enat_io["fwd1.class_labels"]
    batch = model(ids, class_labels=labels).logits
    for row in range(4):
        single = model(ids[row : row + 1], class_labels=labels[row : row + 1]).logits
        assert torch.allclose(single[0], batch[row], atol=1e-5)


@torch.no_grad()
def test_nothing_visible_and_nothing_new(model):
    mask_id = model.mask_token_id
    all_masked = torch.full((2, 16), mask_id)
    out = model(all_masked, class_labels=torch.tensor([1, 2]))
    assert torch.isfinite(out.logits).all()
    # a step that reveals nothing runs the decoder only and keeps the state consistent
    again = model(all_masked, class_labels=torch.tensor([1, 2]), reuse_state=out.reuse_state)
    assert torch.allclose(again.logits, out.logits, atol=1e-6)
    # a step from an empty-visible state equals the plain forward (the context is empty)
    ids = all_masked.clone()
    ids[:, :5] = torch.arange(5)
    reused = model(ids, class_labels=torch.tensor([1, 2]), reuse_state=out.reuse_state)
    assert torch.allclose(reused.logits, model(ids, class_labels=torch.tensor([1, 2])).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- saving and dtypes


def test_save_load_round_trip_and_bfloat16(tmp_path, enat_io):
    model = tiny_transformer()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ENATTransformer2DModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    ids = torch.randint(0, 8, (2, 16))
    ids[:, 3:9] = 8
    labels = torch.tensor([3, 10])
    with torch.no_grad():
        reference = model(ids, class_labels=labels).logits
        assert torch.equal(loaded(ids, class_labels=labels).logits, reference)
        half = ENATTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16
        out = half(ids, class_labels=labels)
        assert out.logits.dtype == torch.bfloat16 and out.reuse_state.hidden_states.dtype == torch.bfloat16
        assert (out.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()
        ids2 = ids.clone()
        ids2[:, 3:5] = 1
        assert torch.isfinite(half(ids2, class_labels=labels, reuse_state=out.reuse_state).logits).all()


def test_training_backward_with_gradient_checkpointing():
    ids = torch.randint(0, 8, (2, 16))
    ids[:, 2:12] = 8
    labels = torch.tensor([1, 10])
    target = torch.randint(0, 8, (2, 16))

    def gradients(checkpointing):
        model = tiny_transformer().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        previous = model(ids, class_labels=labels).reuse_state
        ids_now = ids.clone()
        ids_now[:, 2:6] = 3
        state = ENATReuseState(previous.hidden_states.detach(), previous.mask)
        logits = model(ids_now, class_labels=labels, reuse_state=state).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert "encoder_blocks.0.attn.add_k_proj.weight" in plain  # the reuse context path is trained
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_text_model_encodes_text_once_and_reuses_it():
    model = tiny_transformer(num_classes=None, text_embed_dim=12)
    text, pooled = torch.randn(2, 5, 12), torch.randn(2, 12)
    ids = torch.full((2, 16), 8)
    with torch.no_grad():
        first = model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled)
        assert first.reuse_state.text_hidden_states.shape == (2, 5, 32)
        ids[:, :4] = 1
        reused = model(ids, pooled_text_embeds=pooled, reuse_state=first.reuse_state)  # text comes from the state
        projected = model.prev_proj(first.reuse_state.text_hidden_states)
        assert torch.allclose(reused.reuse_state.text_hidden_states, projected, atol=1e-6)
        other_text = model(ids, encoder_hidden_states=torch.randn(2, 5, 12), pooled_text_embeds=pooled).logits
        assert (
            other_text - model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits
        ).abs().max() > 1e-3


def test_adaln_modulation_is_computed_once_per_condition():
    model = tiny_transformer()
    calls = []
    for block in [*model.encoder_blocks, *model.decoder_blocks]:
        block.adaLN_modulation.register_forward_hook(lambda *args: calls.append(1))
    labels = torch.tensor([1, 10])
    first_ids, ids = torch.full((2, 16), 8), torch.full((2, 16), 8)
    ids[:, :4] = 3

    def uncached(state):  # the same state without the cached modulation
        return ENATReuseState(state.hidden_states, state.mask, state.text_hidden_states)

    with torch.no_grad():
        state = model(first_ids, class_labels=labels).reuse_state
        assert state.modulation.shape == (2, 3, 8 * 32) and len(calls) == 3
        cached = model(ids, class_labels=labels, reuse_state=state).logits
        assert len(calls) == 3  # taken from the state
        assert torch.equal(cached, model(ids, class_labels=labels, reuse_state=uncached(state)).logits)
        assert len(calls) == 6
        other = torch.tensor([1, 4])  # another condition: recomputed, not the state's
        other_logits = model(ids, class_labels=other, reuse_state=state).logits
        assert len(calls) == 9
        assert torch.equal(other_logits, model(ids, class_labels=other, reuse_state=uncached(state)).logits)
        assert (other_logits[1] - cached[1]).abs().max() > 1e-3
    # with gradients the modulation is recomputed, so the adaLN weights are trained on reuse steps too
    model(ids, class_labels=labels, reuse_state=state).logits.square().mean().backward()
    assert len(calls) == 15 and model.decoder_blocks[0].adaLN_modulation.weight.grad.abs().max() > 0
    bad = ENATReuseState(state.hidden_states, state.mask, None, state.conditioning, state.modulation[:, :2])
    with pytest.raises(ValueError, match="reuse_state.modulation has shape"):
        model(ids, class_labels=labels, reuse_state=bad)


# ------------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def small():
    return tiny_transformer()


def masked_ids(rows=((0, 8, 8, 1), (2, 8, 8, 3))):
    ids = torch.tensor(rows).repeat(1, 4)  # (2, 16)
    return ids


def test_unequal_mask_counts(small):
    ids = masked_ids()
    ids[1, 0] = 8
    with pytest.raises(ValueError, match="same number of \\[MASK\\]"):
        small(ids, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [-1, 9])
def test_ids_out_of_range(small, bad):
    ids = masked_ids()
    ids[0, 0] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 8\]"):
        small(ids, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [-1, 11])
def test_labels_out_of_range(small, bad):
    with pytest.raises(ValueError, match=r"outside \[0, 10\]"):
        small(masked_ids(), class_labels=torch.tensor([0, bad]))


def test_wrong_shapes_and_kinds(small):
    with pytest.raises(ValueError, match="4x4 token grid"):
        small(torch.zeros(2, 15, dtype=torch.long), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        small(masked_ids().float(), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 integer labels"):
        small(masked_ids(), class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class-conditional model"):
        small(masked_ids())
    with pytest.raises(ValueError, match="no text embeddings"):
        small(masked_ids(), class_labels=torch.tensor([0, 1]), encoder_hidden_states=torch.zeros(2, 3, 32))
    text_model = tiny_transformer(num_classes=None, text_embed_dim=12)
    with pytest.raises(ValueError, match="text-to-image model"):
        text_model(masked_ids(), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs `encoder_hidden_states`"):
        text_model(masked_ids(), pooled_text_embeds=torch.randn(2, 12))
    with pytest.raises(ValueError, match="Set exactly one"):
        ENATTransformer2DModel(num_classes=None)


def test_reuse_state_that_does_not_contain_the_mask(small):
    labels = torch.tensor([0, 1])
    state = small(masked_ids(), class_labels=labels).reuse_state
    rehidden = masked_ids(((0, 8, 8, 8), (2, 8, 8, 8)))  # position 3 was visible
    with pytest.raises(ValueError, match="only be revealed"):
        small(rehidden, class_labels=labels, reuse_state=state)


def test_reuse_state_of_another_batch_or_shape(small):
    labels = torch.tensor([0, 1])
    state = small(masked_ids(), class_labels=labels).reuse_state
    with pytest.raises(ValueError, match="same batch and model"):
        small(masked_ids()[:1], class_labels=labels[:1], reuse_state=state)
    wrong_mask = ENATReuseState(state.hidden_states, state.mask[:, :8])
    with pytest.raises(ValueError, match="bool tensor of shape"):
        small(masked_ids(), class_labels=labels, reuse_state=wrong_mask)
    uneven = state.mask.clone()
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="different numbers of masked tokens"):
        small(
            masked_ids(((8, 8, 8, 1), (8, 8, 8, 3))),
            class_labels=labels,
            reuse_state=ENATReuseState(state.hidden_states, uneven),
        )


# ------------------------------------------------------------------------------ 2D rotary position embeddings


def test_rotary_scores_depend_on_the_grid_offset_only():
    from enat_diffusers.models.transformer_enat import apply_rotary, grid_rotary_table

    side, head_dim = 5, 8
    cos, sin = grid_rotary_table(side, head_dim)
    assert cos.shape == sin.shape == (side * side + 1, head_dim)
    assert torch.equal(cos[-1], torch.ones(head_dim)) and torch.equal(sin[-1], torch.zeros(head_dim))
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(p, r):  # the rotated q at grid position p against the rotated k at r, positions as (row, col)
        rows = torch.tensor([[p[0] * side + p[1], r[0] * side + r[1]]])
        x = torch.stack([q, k]).view(1, 2, 1, head_dim)
        rotated = apply_rotary(x, (cos[rows], sin[rows]))[0, :, 0]
        return float(rotated[0] @ rotated[1])

    assert score((0, 0), (1, 2)) == pytest.approx(score((3, 2), (4, 4)), abs=1e-5)  # same offset (1, 2)
    assert score((2, 1), (2, 3)) == pytest.approx(score((0, 0), (0, 2)), abs=1e-5)
    assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3  # rows and columns are told apart
    assert float(q @ k) == pytest.approx(score((3, 3), (3, 3)), abs=1e-5)  # no offset, no change


def positional_model():
    """A rotary text model whose blocks and prev_proj are the identity and whose token embeddings are zero, so
    every hidden state entering attention is its token's (normalised) position embedding: its grid position can be
    read back and checked against the rotation it gets."""
    model = ENATTransformer2DModel(
        sample_size=4, codebook_size=8, hidden_size=32, num_attention_heads=2, num_encoder_layers=2,
        num_decoder_layers=2, num_classes=None, text_embed_dim=16, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        model.prev_proj.ff.net[2].weight.zero_()
        model.prev_proj.ff.net[2].bias.zero_()
        model.embed.word_embeddings.weight.zero_()
    return model


def test_rotary_positions_follow_their_tokens_with_and_without_reuse(monkeypatch):
    from enat_diffusers.models import transformer_enat

    model = positional_model()
    norm = torch.nn.functional.layer_norm
    table = norm(norm(model.embed.position_embeddings.weight, (32,), eps=1e-6), (32,), eps=1e-6).detach()
    cos_table = transformer_enat.grid_rotary_table(4, 16)[0]
    checked = {"image": 0, "text": 0, "wrong": 0}

    def check(states, rotary):
        similarity = torch.nn.functional.normalize(states, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        best, position = similarity.max(-1)  # (B, N)
        for b, n in torch.cartesian_prod(torch.arange(states.shape[0]), torch.arange(states.shape[1])).tolist():
            kind = "image" if best[b, n] > 0.999 else "text"
            expected = cos_table[position[b, n]] if kind == "image" else cos_table[-1]
            checked[kind] += 1
            checked["wrong"] += not torch.allclose(rotary[0][b, n], expected)

    original = transformer_enat.ENATAttnProcessor.__call__

    def checking(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check(hidden_states, rotary_emb[0])
        if encoder_hidden_states is not None:
            check(encoder_hidden_states, rotary_emb[1])
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    monkeypatch.setattr(transformer_enat.ENATAttnProcessor, "__call__", checking)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 8, (3, 16), generator=generator)
    order = torch.rand(3, 16, generator=generator).argsort(1)
    text, pooled = torch.randn(3, 5, 16, generator=generator), torch.randn(3, 16, generator=generator)
    with torch.no_grad():
        first = clean.scatter(1, order[:, :12], 8)  # 4 visible per row, at different positions in each row
        state = model(first, encoder_hidden_states=text, pooled_text_embeds=pooled).reuse_state
        model(clean.scatter(1, order[:, :9], 8), pooled_text_embeds=pooled, reuse_state=state)  # 3 revealed
    assert checked["wrong"] == 0
    assert checked["image"] > 100 and checked["text"] > 20  # both kinds of token were seen in every role


def test_rotary_model_round_trip_and_default_off(tmp_path):
    plain = tiny_transformer(num_classes=None, text_embed_dim=12)
    assert plain.config.use_rotary_positional_embeddings is False
    model = tiny_transformer(num_classes=None, text_embed_dim=12, use_rotary_positional_embeddings=True)
    ids = torch.randint(0, 8, (2, 16))
    ids[:, 3:11] = 8
    text, pooled = torch.randn(2, 5, 12), torch.randn(2, 12)
    with torch.no_grad():
        logits = model(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits
        assert (logits - plain(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits).abs().max() > 1e-3
        model.save_pretrained(tmp_path)
        loaded = ENATTransformer2DModel.from_pretrained(tmp_path).eval()
        assert loaded.config.use_rotary_positional_embeddings is True
        assert torch.equal(loaded(ids, encoder_hidden_states=text, pooled_text_embeds=pooled).logits, logits)
    with pytest.raises(ValueError, match="multiple of 4"):
        ENATTransformer2DModel(hidden_size=36, num_attention_heads=6, use_rotary_positional_embeddings=True)


def test_rotary_positions_of_token_groups_are_in_tokens():
    """A grid of 2x2 groups is rotated at its groups' token positions: group (r, c) as token (2r, 2c) of the grid
    twice as wide, so an offset in the image is rotated the same way with and without groups."""
    from enat_diffusers.models.transformer_enat import grid_rotary_table

    groups = grid_rotary_table(3, 8, spacing=2)
    tokens = grid_rotary_table(6, 8)
    rows = torch.tensor([2 * r * 6 + 2 * c for r in range(3) for c in range(3)] + [36])  # and the text row
    assert all(torch.allclose(g, t[rows]) for g, t in zip(groups, tokens))
    assert not torch.allclose(groups[0], grid_rotary_table(3, 8)[0])
    model = tiny_transformer(sample_size=8, patch_size=2, use_rotary_positional_embeddings=True)
    rotations = model._rotary_emb(torch.arange(17).unsqueeze(0), torch.float32)  # the 4x4 groups, then text
    assert all(torch.allclose(r[0], t) for r, t in zip(rotations, grid_rotary_table(4, 16, spacing=2)))


@torch.no_grad()
def test_ungroup_computes_the_grouped_model_on_grids_whose_groups_repeat_one_token():
    """Without rotary positions and text tokens (whose keys would not be repeated), a group and its four copies are
    attended to alike, so on a grid whose groups each repeat one token, masked or visible as a whole, the ungrouped
    model's logits are the grouped model's (its four output projections made equal: the head keeps their mean)."""
    grouped = tiny_transformer(sample_size=8, patch_size=2, num_decoder_layers=2)
    dim = grouped.config.hidden_size
    grouped.proj_out.weight.copy_(grouped.proj_out.weight[:dim].repeat(4, 1))
    grouped.proj_out.bias.copy_(grouped.proj_out.bias[:dim].repeat(4))
    ungrouped = grouped.ungroup()
    assert ungrouped.config.patch_size == 1 and ungrouped.config.project_tokens
    assert grouped.config.patch_size == 2 and grouped.embed.patch_embed.weight.shape == (dim, 4 * dim)  # unchanged

    generator = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 8, (3, 16), generator=generator)
    group_ids[:, torch.randperm(16, generator=generator)[:9]] = 8  # 9 of 16 groups masked
    ids = ungroup_tokens(group_ids.unsqueeze(-1).expand(-1, -1, 4), 2)  # (3, 64), each group one token
    labels = torch.tensor([1, 4, 10])
    first_grouped, first = grouped(ids, class_labels=labels), ungrouped(ids, class_labels=labels)
    assert first.logits.shape == (3, 64, 8)
    assert close(first.logits, first_grouped.logits)

    # and the next step, with the reuse state of the first (3 more groups revealed)
    revealed = torch.where(group_ids == 8, torch.randint(0, 8, (3, 16), generator=generator), group_ids)
    masked = torch.sort((group_ids == 8).int(), dim=1, descending=True, stable=True).indices[:, 3:9]  # 6 stay
    group_ids = revealed.scatter(1, masked, 8)
    ids = ungroup_tokens(group_ids.unsqueeze(-1).expand(-1, -1, 4), 2)
    second_grouped = grouped(ids, class_labels=labels, reuse_state=first_grouped.reuse_state)
    second = ungrouped(ids, class_labels=labels, reuse_state=first.reuse_state)
    assert close(second.logits, second_grouped.logits)


def test_ungroup_round_trip_and_errors(tmp_path):
    ungrouped = tiny_transformer(sample_size=8, patch_size=2, use_rotary_positional_embeddings=True).ungroup()
    ungrouped.save_pretrained(tmp_path)
    loaded = ENATTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.project_tokens and loaded.embed.patch_embed.weight.shape == (32, 32)
    ids = torch.randint(0, 8, (2, 64))
    ids[:, 5:40] = 8
    with torch.no_grad():
        assert torch.equal(loaded(ids, class_labels=torch.tensor([0, 3])).logits,
                           ungrouped.eval()(ids, class_labels=torch.tensor([0, 3])).logits)  # fmt: skip
    assert tiny_transformer().embed.patch_embed is None  # the released layout: no projection of single tokens
    with pytest.raises(ValueError, match="one position per token already"):
        loaded.ungroup()
