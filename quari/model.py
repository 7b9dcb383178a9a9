"""The QuARI hypernetwork: from a query embedding to an adapted query and a low-rank gallery map.

One shared pre-norm transformer refines a control token (the encoded query plus a step
embedding) and 2r zero-initialised tokens, r "U" and r "V", for ``num_steps`` steps; two MLP
decoders turn the tokens into the columns of U and V (E x r each) and a third decodes the
control token into the adapted query. The output is a :class:`~quari.transform.QueryTransform`,
so the E x E map is never formed.

Two variants (``QuARIConfig.variant``):

``"released"`` reproduces the authors' released ``TransformerHypernetwork`` (and loads its
checkpoints, see :mod:`quari.checkpoint`): U and V tokens share the position codes pe[:r], the
control token gets none; U' = U/||U||_F, V' = V/||V||_F; gallery rows are mapped by
d W = d (I + a U'V'^T) with a = ``anchor_scale``; q' = normalize((1-w) MLP_q(ctx) + w q) with
w = ``query_residual_weight``.

``"paper"`` follows the paper's description: every one of the 2r tokens gets its own position
code (its position in the sequence [control, U_1..U_r, V_1..V_r], i.e. pe[1..2r]); the map is the
pure low-rank T = sum_j u_j v_j^T (Frobenius-normalised factors only if ``fro_norm``, which does
not change cosine scores); q' = normalize(MLP_q(ctx)).

Parameter and buffer names are those of the released module (``query_encoder``, ``step_proj``,
``pos_emb``, ``pos_scale``, ``transformer``, ``query_decoder``, ``dec_u_img``, ``dec_v_img``), so
a released state dict loads with no renaming. As in the released code, ``dropout`` acts inside
the query encoder, every transformer layer and the three decoders; ``pos_scale`` is a buffer
(fixed at 1), not a parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quari.transform import BasisQueryTransform, QueryTransform

VARIANTS = ("released", "paper")

# Added to the Frobenius norms before dividing, as in the released code.
FRO_EPS = 1e-8


@dataclass
class QuARIConfig:
    """Hyperparameters of the hypernetwork; defaults are the released CLIP-B configuration."""

    embedding_dim: int  # E: width of the backbone embeddings (768 for CLIP-L/14, 512 for CLIP-B/16)
    hidden_dim: int = 512  # H: token width (released: 512; not stated in the paper)
    nhead: int = 8  # attention heads of the shared transformer (released: 8)
    num_layers: int = 4  # layers of the shared transformer (paper, CLIP-B: 4; CLIP-L checkpoint: 6)
    num_steps: int = 4  # refinement steps through the shared transformer (released: 4)
    rank: int = 64  # r: rank of the gallery map (paper and released: 64)
    dropout: float = 0.1  # dropout in query encoder, transformer and decoders (released: 0.1)
    token_dropout: float = 0.05  # training-only probability of zeroing a U/V token per step
    variant: str = "released"  # "released" (identity-anchored, loads checkpoints) or "paper"
    anchor_scale: float = 0.8  # a in W = I + a U'V'^T (released variant only)
    query_residual_weight: float = 0.5  # w in q' = normalize((1-w) MLP_q + w q) (released only)
    fro_norm: bool = True  # divide U and V by their Frobenius norms (released: true)
    # Hidden width of the three MLP decoders (None: hidden_dim, as released). Every decoded vector
    # lies in the span of the decoder's last layer, at most this many directions of R^E, so a
    # hidden_dim much smaller than E (CPU-sized models) confines U, V and q' to a fixed subspace.
    decoder_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QuARIConfig.{name} must be a positive integer, got {value!r}")

        for name in ("embedding_dim", "hidden_dim", "nhead", "num_layers", "num_steps", "rank"):
            positive_int(name)
        if self.decoder_hidden_dim is not None:
            positive_int("decoder_hidden_dim")
        if self.hidden_dim % 2:
            raise ValueError(f"QuARIConfig.hidden_dim must be even (sinusoidal codes), "
                             f"got {self.hidden_dim}")
        if self.hidden_dim % self.nhead:
            raise ValueError(f"QuARIConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                             f"QuARIConfig.nhead ({self.nhead})")
        for name in ("dropout", "token_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"QuARIConfig.{name} must be a probability in [0, 1), got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"QuARIConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if (isinstance(self.anchor_scale, bool) or not isinstance(self.anchor_scale, (int, float))
                or not math.isfinite(self.anchor_scale)):
            raise ValueError(f"QuARIConfig.anchor_scale must be a finite number, "
                             f"got {self.anchor_scale!r}")
        w = self.query_residual_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            raise ValueError(f"QuARIConfig.query_residual_weight must be in [0, 1], got {w!r}")
        if not isinstance(self.fro_norm, bool):
            raise ValueError(f"QuARIConfig.fro_norm must be a bool, got {self.fro_norm!r}")


def timestep_embedding(steps: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [len(steps), width] of step indices: [cos(t f_i), sin(t f_i)].

    Frequencies f_i = max_period^(-i / (width // 2)); an odd width is padded with a zero column.
    """
    half = width // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=steps.device) / half)
    args = steps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, width % 2))


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """Transformer position codes [length, width]: sin on even columns, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / width))
    codes = torch.zeros(length, width)
    codes[:, 0::2] = torch.sin(pos * inv_freq)
    codes[:, 1::2] = torch.cos(pos * inv_freq)
    return codes


def _decoder(hidden: int, width: int, out: int, dropout: float) -> nn.Sequential:
    """Two-layer MLP decoder from a token of size ``hidden`` through ``width`` units to R^out."""
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(width, out))


class QuARI(nn.Module):
    """Query-adaptive hypernetwork: ``QuARI(config)(queries [B, E]) -> QueryTransform``."""

    def __init__(self, config: QuARIConfig) -> None:
        super().__init__()
        self.config = config
        e, h, r, p = config.embedding_dim, config.hidden_dim, config.rank, config.dropout
        self.query_encoder = nn.Sequential(nn.Linear(e, h), nn.LayerNorm(h), nn.GELU(),
                                           nn.Dropout(p), nn.Linear(h, h), nn.LayerNorm(h))
        self.step_proj = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        # One code per sequence position (control + 2r tokens); persistent because the released
        # checkpoints store them.
        self.register_buffer("pos_emb", sinusoidal_positions(2 * r + 1, h))
        self.register_buffer("pos_scale", torch.ones(1))
        layer = nn.TransformerEncoderLayer(d_model=h, nhead=config.nhead, dim_feedforward=4 * h,
                                           dropout=p, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.num_layers,
                                                 enable_nested_tensor=False)
        d = config.decoder_hidden_dim or h
        self.query_decoder = _decoder(h, d, e, p)
        self.dec_u_img = _decoder(h, d, e, p)
        self.dec_v_img = _decoder(h, d, e, p)

    def num_parameters(self) -> int:
        """Number of learnable parameters (buffers excluded)."""
        return sum(p.numel() for p in self.parameters())

    def _token_positions(self) -> torch.Tensor:
        """Position codes [2r, H] added to the U and V tokens at every step."""
        r = self.config.rank
        if self.config.variant == "released":
            return torch.cat([self.pos_emb[:r], self.pos_emb[:r]])
        return self.pos_emb[1:2 * r + 1]

    def _token_dropout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Zero each U/V token with probability ``token_dropout`` (training only, no rescaling).

        The U mask is drawn before the V mask, each [B, r, 1], as in the released code, so the
        same torch seed gives the same masks.
        """
        p = self.config.token_dropout
        if not self.training or p == 0:
            return tokens
        b, r = tokens.shape[0], self.config.rank
        keep = [torch.rand(b, r, 1, device=tokens.device) > p for _ in range(2)]
        return tokens * torch.cat(keep, dim=1).to(tokens.dtype)

    def forward(self, queries: torch.Tensor,
                in_basis: bool = False) -> QueryTransform | BasisQueryTransform:
        """The adapted queries and factored gallery maps for queries [B, E].

        ``in_basis``: return the same maps as a :class:`BasisQueryTransform` (the factors as
        coefficients of the U and V decoders' last layers, see :meth:`_decode_in_basis`), which
        training scores faster; ``.expand()`` gives the :class:`QueryTransform` returned otherwise.
        """
        cfg = self.config
        if queries.dim() != 2 or queries.shape[1] != cfg.embedding_dim:
            raise ValueError(f"queries must be [B, {cfg.embedding_dim}], "
                             f"got shape {tuple(queries.shape)}")
        b, r = queries.shape[0], cfg.rank
        ctx = self.query_encoder(queries)
        tokens = ctx.new_zeros(b, 2 * r, cfg.hidden_dim)  # U tokens, then V tokens
        positions = self.pos_scale * self._token_positions()
        for step in range(cfg.num_steps):
            step_code = timestep_embedding(torch.full((b,), step, device=queries.device),
                                           cfg.hidden_dim)
            control = ctx + self.step_proj(step_code.to(ctx.dtype))
            out = self.transformer(torch.cat([control[:, None], tokens + positions], dim=1))
            # residual refinement of every token, the control token included
            ctx = ctx + out[:, 0]
            tokens = self._token_dropout(tokens + out[:, 1:])
        decoded = self.query_decoder(ctx)
        if cfg.variant == "released":
            w = cfg.query_residual_weight
            query = F.normalize((1.0 - w) * decoded + w * queries, dim=-1)
            scale, anchor = float(cfg.anchor_scale), 1.0
        else:
            query, scale, anchor = F.normalize(decoded, dim=-1), 1.0, 0.0
        if in_basis:
            u = self._decode_in_basis(self.dec_u_img, tokens[:, :r])  # (basis, coefficients)
            v = self._decode_in_basis(self.dec_v_img, tokens[:, r:])
        else:
            u = self.dec_u_img(tokens[:, :r]).transpose(1, 2)  # [B, E, r]
            v = self.dec_v_img(tokens[:, r:]).transpose(1, 2)
            if cfg.fro_norm:
                u = u / (torch.linalg.matrix_norm(u, keepdim=True) + FRO_EPS)
                v = v / (torch.linalg.matrix_norm(v, keepdim=True) + FRO_EPS)
        # released: d W = d (I + a U'V'^T); paper: T d = U V^T d, i.e. the row vector d V U^T
        left, right = (u, v) if cfg.variant == "released" else (v, u)
        if in_basis:
            return BasisQueryTransform(query, *left, *right, scale, anchor)
        return QueryTransform(query=query, left=left, right=right, scale=scale, anchor=anchor)

    def _decode_in_basis(self, decoder: nn.Sequential,
                         tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded factor [B, E, r] of ``tokens`` [B, r, H] as basis [E, k] x coefficients
        [B, k, r].

        The decoder's last layer maps its hidden activations a (width k - 1) to W a + b =
        [W | b] [a; 1], so [W | b] is the basis and [a; 1] a column's coefficients; the Frobenius
        norm of the factor is sqrt(sum_j c_j^T (B^T B) c_j), from k x k products only.
        """
        hidden = decoder[:-1](tokens)  # [B, r, k - 1], dropout included
        last = decoder[-1]
        basis = torch.cat([last.weight, last.bias[:, None]], dim=1)  # [E, k]
        coef = torch.cat([hidden, hidden.new_ones(hidden.shape[:2] + (1,))], dim=2)
        coef = coef.transpose(1, 2)  # [B, k, r]
        if self.config.fro_norm:  # in float32 also under mixed precision (fp16 overflows at
            # E r ~ 65,000, e.g. E 768 and rank 64 with unit entries)
            with torch.autocast(tokens.device.type, enabled=False):
                wide = torch.promote_types(coef.dtype, torch.float32)  # float64 stays float64
                basis_w, coef_w = basis.to(wide), coef.to(wide)
                squared = torch.einsum("bkr,kl,blr->b", coef_w, basis_w.T @ basis_w, coef_w)
            coef = coef / (squared.clamp_min(0).sqrt() + FRO_EPS)[:, None, None]
        return basis, coef

    def transform(self, queries: torch.Tensor) -> QueryTransform:
        """Alias of calling the module: the :class:`QueryTransform` of queries [B, E]."""
        return self(queries)
