"""A re-statement of the ORIGINAL ENAT computation (LeapLabTHU/ENAT, `libs/models.py::DiT` and
`libs/nat_misc.py::NATSchedule.generate`), written from `ENAT_SEMANTICS.md`.

This is NOT the original code. It keeps the original's *computational structure*, so that it serves as

* a fair speed baseline for the diffusers port (`benchmark_sampling.py`), and
* an independent numerical cross-check: it loads ORIGINAL-format state dicts with `strict=True` and must reproduce
  the ids recorded from the original code (`tests/fixtures/enat_tiny_io.safetensors`).

Structure kept from the original (the port differs in each point):

* module tree with the original parameter names (`x_embedder`, `y_embedder`, unused `prev_embedder`, `prev_proj`,
  `blocks.{i}.attn.q/kv.A/kv.B/proj`, `blocks.{i}.mlp`, `blocks.{i}.adaLN_modulation.1`, `norm`, `mlm_layer`);
* separate `q` and a "multiway" fused `kv` Linear: the kv input is [context; own tokens], split with `torch.split`
  at the context length, `kv.A` on the first part, `kv.B` on the second, results concatenated;
* manual attention `softmax(q @ k^T * scale) @ v`;
* boolean-index token splits (`x[~masking].reshape(B, -1, D)`), `torch.empty` + `masked_scatter` to restore, and the
  asserts that synchronise with the host;
* the head computes K+1 logits and slices `[..., :K]`;
* the sampler makes two separate model calls per step (conditional, then null label), each with its own reuse chain,
  samples all positions with `torch.distributions.Categorical`, and draws the Gumbel noise with NumPy.
"""

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm-style `Mlp`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Embeddings(nn.Module):
    """BERT-style embeddings: word + learned position, LayerNorm (eps 1e-6), dropout (inactive in eval)."""

    def __init__(self, vocab_size: int, num_positions: int, dim: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(num_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: null class

    def forward(self, labels):
        return self.embedding_table(labels)


class PrevProj(nn.Module):
    """Residual MLP on the previous step's features: u + Mlp(LN(u))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MultiwayLinear(nn.Module):
    """Routes tokens [0, split_position) to `A` (context) and the rest to `B` (own tokens)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.A = nn.Linear(dim, out_dim)
        self.B = nn.Linear(dim, out_dim)
        self.split_position = 0  # mutable, set before every call, as in the original

    def forward(self, x):  # (B, N, D) -> (B, N, out_dim)
        if self.split_position == 0:
            return self.B(x)
        ctx, own = torch.split(x, [self.split_position, x.shape[1] - self.split_position], dim=1)
        return torch.cat([self.A(ctx), self.B(own)], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = MultiwayLinear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context: Optional[torch.Tensor] = None):
        """x: (B, N, D) own tokens (queries); context: (B, Nc, D) keys/values only."""
        B, N, D = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).permute(0, 2, 1, 3)  # (B, H, N, Dh)
        kv_input = x if context is None else torch.cat([context, x], dim=1)  # (B, Nc + N, D)
        self.kv.split_position = 0 if context is None else context.shape[1]
        kv = self.kv(kv_input).reshape(B, kv_input.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, H, Nc + N, Dh)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm1_ = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)  # context tokens
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 8 * dim))

    def forward(self, x, c, context=None):
        (shift_msa, scale_msa, shift_msa_, scale_msa_,
         gate_msa, shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(8, dim=1)  # fmt: skip
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if context is not None:
            context = modulate(self.norm1_(context), shift_msa_, scale_msa_)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, context)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class MlmLayer(nn.Module):
    """fc -> exact GELU -> LayerNorm (eps 1e-5), then scores against the tied embedding table, plus a bias."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x, word_embeddings):
        x = self.ln(F.gelu(self.fc(x)))
        return torch.matmul(x, word_embeddings.transpose(0, 1)) + self.bias  # (B, L, K+1)


class OriginalENAT(nn.Module):
    """The ENAT `DiT` transformer with the original's parameter names and computational structure."""

    def __init__(self, input_size=16, hidden_size=1024, num_heads=16, enc_dec=(22, 2), mlp_ratio=4.0,
                 num_classes=1000, codebook_size=1024):  # fmt: skip
        super().__init__()
        self.codebook_size = codebook_size  # also the [MASK] id
        self.num_encoder_blocks = enc_dec[0]
        self.x_embedder = Embeddings(codebook_size + 1, input_size**2, hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.prev_embedder = Mlp(hidden_size, 4 * hidden_size)  # never used, as in the original
        self.prev_proj = PrevProj(hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(sum(enc_dec))])
        self.norm = nn.LayerNorm(hidden_size)
        self.mlm_layer = MlmLayer(hidden_size, codebook_size + 1)

    @classmethod
    def from_state_dict(cls, state_dict, num_heads: int, num_encoder_blocks: int) -> "OriginalENAT":
        """Builds the model from an original-format state dict (strict load); shapes give the rest."""
        model = cls(num_heads=num_heads, **architecture(state_dict, num_encoder_blocks))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def forward(self, masked_ids, context, prev_dict=None, return_dict=False):
        """masked_ids: (B, L) ids, `codebook_size` = [MASK]; context: (B,) labels; prev_dict: last call's dict."""
        x = self.x_embedder(masked_ids)  # (B, L, D)
        B, L, D = x.shape
        c = self.y_embedder(context.reshape(-1))  # (B, D)
        masking = masked_ids == self.codebook_size  # (B, L)
        num_masked = masking.sum(-1)
        assert torch.all(num_masked == num_masked[0]), "every row needs the same number of masks"
        encoder = self.blocks[: self.num_encoder_blocks]
        decoder = self.blocks[self.num_encoder_blocks :]

        if prev_dict is None:
            visible = x[~masking].reshape(B, -1, D)  # (B, n_v, D)
            if visible.shape[1] > 0:
                for blk in encoder:
                    visible = blk(visible, c)
        else:
            prev_mask = prev_dict["masking"]  # (B, L)
            assert torch.all(prev_mask[masking]), "tokens may only be revealed"
            num_prev_visible = (~prev_mask).sum(-1)
            assert torch.all(num_prev_visible == num_prev_visible[0]), "unequal previous visible tokens"
            # features of the previously visible tokens, through prev_proj: the encoder's context
            prev_feat = self.prev_proj(prev_dict["feat"][~prev_mask].reshape(B, -1, D)).to(x.dtype)  # (B, n_v', D)
            new_mask = ~masking & prev_mask  # revealed since the previous call
            new = x[new_mask].reshape(B, -1, D)  # (B, n_new, D)
            if new.shape[1] > 0:
                for blk in encoder:
                    new = blk(new, c, context=prev_feat)
            # visible set in position order, re-assembled through a padded (B, L, D) tensor
            padded = torch.empty_like(x)
            padded = padded.masked_scatter(new_mask.unsqueeze(-1), new)
            padded = padded.masked_scatter((~prev_mask).unsqueeze(-1), prev_feat)
            visible = padded[~masking].reshape(B, -1, D)  # (B, n_v, D)

        masked = x[masking].reshape(B, -1, D)  # (B, n_m, D)
        for blk in decoder:
            masked = blk(masked, c, context=visible)

        feat = torch.empty_like(x)  # (B, L, D), pre-final-norm features
        feat = feat.masked_scatter((~masking).unsqueeze(-1), visible)
        feat = feat.masked_scatter(masking.unsqueeze(-1), masked)
        word_embeddings = self.x_embedder.word_embeddings.weight.data.detach()
        logits = self.mlm_layer(self.norm(feat), word_embeddings)[..., : self.codebook_size]  # (B, L, K)
        if return_dict:
            return {"masking": masking, "feat": feat, "logits": logits}
        return logits


def architecture(state_dict, num_encoder_blocks: int) -> dict:
    """The `DiT` constructor arguments that an original-format state dict's shapes determine (all but the heads)."""
    vocab, dim = state_dict["x_embedder.word_embeddings.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return dict(
        input_size=math.isqrt(state_dict["x_embedder.position_embeddings.weight"].shape[0]),
        hidden_size=dim,
        enc_dec=(num_encoder_blocks, depth - num_encoder_blocks),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        codebook_size=vocab - 1,
    )


@torch.no_grad()
def generate(model: OriginalENAT, labels: torch.Tensor, steps: int, cfg_scale: float, mask_temp: float,
             samp_temp: float, null_label: int) -> torch.Tensor:  # fmt: skip
    """`NATSchedule.generate` (semantics §5). labels: (n,) -> final sampled ids (n, L).

    Randomness: torch's global RNG (Categorical sampling) and NumPy's global RNG (Gumbel noise); seed both.
    Logits are upcast to float32 before guidance (the original's fp16 autocast runs log_softmax in float32).
    """
    device = labels.device
    K = model.codebook_size
    n, L = labels.shape[0], model.x_embedder.position_embeddings.weight.shape[0]
    ids = torch.full((n, L), K, dtype=torch.long, device=device)
    null = torch.full((n, 1), null_label, dtype=torch.long, device=device)
    scale = 0.0
    cond_state = uncond_state = None
    for step in range(steps):
        ratio = (step + 1) / steps
        mask_ratio = np.cos(ratio * np.pi / 2)  # float64
        mask_temperature = mask_temp * (1 - ratio)
        temperature = max(samp_temp * (1 - ratio), 1e-3)

        cond_state = model(ids, context=labels, prev_dict=cond_state, return_dict=True)
        uncond_state = model(ids, context=null, prev_dict=uncond_state, return_dict=True)
        cond, uncond = cond_state["logits"].float(), uncond_state["logits"].float()
        logits = cond + scale * (cond - uncond)
        log_probs = torch.log_softmax(logits, dim=-1)  # (n, L, K)

        is_masked = ids == K
        sampled = torch.distributions.Categorical(logits=log_probs / temperature).sample()  # (n, L), all positions
        sampled = torch.where(is_masked, sampled, ids)
        confidence = torch.gather(log_probs, -1, sampled.unsqueeze(-1)).squeeze(-1)
        confidence = torch.where(is_masked, confidence, torch.full_like(confidence, float("inf")))
        gumbel = torch.from_numpy(np.random.gumbel(size=(n, L))).to(device)
        confidence = confidence + mask_temperature * gumbel

        num_to_mask = int(np.floor(L * mask_ratio))
        lowest = torch.argsort(confidence, dim=-1)[:, :num_to_mask]  # ascending
        ids = sampled.scatter(1, lowest, K)
        scale = ratio * cfg_scale
    return sampled
