"""The distillation loss of a draft head against a frozen target (what train_head.py optimises), on any device.

For random anchor positions a of each training sequence, the head sees `[x_a, MASK x (B-1)]` at positions
a .. a+B-1 and the target's taps of positions < a; block row j learns the target's distribution at position
a+j-1 (the token at depth j), by forward KL (optionally tempered) or cross-entropy on the target's argmax. All
anchors of all sequences go through one head forward under a block-sparse mask. The anchor row has no loss;
depth j can be weighted by exp(-(j-1)/gamma).

Device rules: every index and mask tensor is built on the tokens' device with tensor ops (no host read per
anchor); the teacher runs without gradients (Triton kernels on CUDA); the head's forward needs gradients, and
`kernels` routes every call that needs them to the autograd-capable torch reference.
"""
import random

import torch
import torch.nn.functional as F

from nanojet.model.head import DraftHead
from nanojet.model.qwen3 import Qwen3


def training_mask(anchors: torch.Tensor, seq_len: int, block_size: int, causal: bool) -> torch.Tensor:
    """Block-sparse bool mask `[Q, C + Q]` for the blocks of `anchors` `[batch, A]` flattened into one forward.

    Context rows are every sequence's `seq_len` positions laid end to end (C = batch * seq_len); block rows are
    the blocks of every anchor, in order (Q = batch * A * block_size). A block of anchor a in sequence s sees
    s's context rows < a, and its own rows (all of them, or rows <= itself when causal): exactly what the
    inference path shows the head."""
    device = anchors.device
    batch, per_sequence = anchors.shape
    rows = torch.arange(batch * per_sequence * block_size, device=device)
    block = rows // block_size  # [Q] which anchor's block a row belongs to
    row_sequence = block // per_sequence
    row_anchor = anchors.flatten()[block]
    context = torch.arange(batch * seq_len, device=device)
    sees_context = ((context[None, :] // seq_len) == row_sequence[:, None]) & \
                   ((context[None, :] % seq_len) < row_anchor[:, None])
    sees_block = block[None, :] == block[:, None]
    if causal:
        sees_block &= rows[None, :] <= rows[:, None]
    return torch.cat([sees_context, sees_block], dim=1)


def sample_anchors(batch: int, seq_len: int, block_size: int, per_sequence: int, generator: random.Random,
                   device: torch.device) -> torch.Tensor:
    """`[batch, per_sequence]` sorted anchor positions: each needs context before it (a >= 1) and a whole block
    of labels inside the sequence. Drawn on the host, copied to `device` once."""
    anchors = [sorted(generator.sample(range(1, seq_len - block_size + 1), per_sequence)) for _ in range(batch)]
    return torch.tensor(anchors, device=device)


def head_loss(target: Qwen3, head: DraftHead, tokens: torch.Tensor, anchors_per_sequence: int, loss_kind: str,
              temperature: float, gamma: float | None, generator: random.Random) -> tuple[torch.Tensor, dict]:
    """Loss of one batch `[batch, seq]` of token ids; returns (loss, per-depth accuracy of the head's argmax)."""
    anchors = sample_anchors(*tokens.shape, head.config.block_size, anchors_per_sequence, generator, tokens.device)
    teacher, student = block_logits(target, head, tokens, anchors)
    if loss_kind == "kl":
        teacher_logp = torch.log_softmax(teacher / temperature, -1)
        student_logp = torch.log_softmax(student / temperature, -1)
        per_row = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    else:
        per_row = F.cross_entropy(student.flatten(0, 2), teacher.argmax(-1).flatten(),
                                  reduction="none").view(student.shape[:-1])
    depth = torch.arange(student.shape[2], dtype=torch.float32, device=tokens.device)
    weights = torch.exp(-depth / gamma) if gamma else torch.ones_like(depth)
    loss = (per_row.mean((0, 1)) * weights).sum() / weights.sum()
    with torch.no_grad():
        accuracy = (student.argmax(-1) == teacher.argmax(-1)).float().mean((0, 1))
    return loss, {"per_depth_accuracy": accuracy}


def block_logits(target: Qwen3, head: DraftHead, tokens: torch.Tensor,
                 anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) logits `[batch, A, B-1, V]` fp32 for the blocks anchored at `anchors` `[batch, A]` of
    `tokens` `[batch, seq]`: row j of each is the distribution of the token at depth j (position a + j).
    The teacher runs without gradients; the student keeps them."""
    batch, seq = tokens.shape
    device = tokens.device
    block_size = head.config.block_size
    anchors_per_sequence = anchors.shape[1]
    offsets = torch.arange(block_size, device=device)
    sequence = torch.arange(batch, device=device)[:, None, None]
    label_positions = anchors[:, :, None] + offsets[:-1]  # [batch, A, B-1]: row j (1..B-1) <- position a+j-1
    with torch.no_grad():
        hidden, taps = target.forward_dense(tokens, tap_layers=tuple(head.config.target_layer_ids))
        teacher = target.logits(hidden[sequence, label_positions])  # [batch, A, B-1, V] fp32, only these rows
    block_tokens = torch.full((batch, anchors_per_sequence, block_size), head.config.mask_token_id, device=device)
    block_tokens[:, :, 0] = tokens.gather(1, anchors)
    context = head.project_context(taps.flatten(0, 1))
    mask = training_mask(anchors, seq, block_size, head.config.causal)
    out = head.forward_dense(context, torch.arange(seq, device=device).repeat(batch),
                             target.embed_tokens(block_tokens.flatten()),
                             (anchors[:, :, None] + offsets).flatten(), mask)
    student = target.logits(out.view(batch, anchors_per_sequence, block_size, -1)[:, :, 1:])  # anchor row: no loss
    return teacher, student
