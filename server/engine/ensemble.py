"""Lockstep groups on the device: one next-token distribution from several rows.

A lockstep group (request.RequestGroup) is one prompt under several prefixes, decoded as one: at
each step its next token is chosen from the mean of its rows' log-softmax distributions (a
product of experts; softmax of that mean is their normalised geometric mean) with the leader's
sampling settings and generator, and every row takes that token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import Request, RequestGroup


def mean_of_groups(
    logits: torch.Tensor, requests: Sequence[Request]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits [S, V]` with each lockstep group's leader row replaced by the mean of its rows'
    log-softmax, and `source [S]`: the row whose sampled token each row takes (its leader's,
    else its own). `(logits, None)` when no row belongs to a lockstep group."""
    row_of = {id(request): i for i, request in enumerate(requests)}
    groups: dict[int, RequestGroup] = {}
    for request in requests:
        group = request.lockstep_group
        if group is not None:
            groups.setdefault(id(group), group)
    if not groups:
        return logits, None
    source = list(range(len(requests)))
    member_rows: list[int] = []
    group_of_row: list[int] = []
    leader_rows: list[int] = []
    sizes: list[int] = []
    for index, group in enumerate(groups.values()):
        # A lockstep group's rows sample in the same step, always all of them.
        rows = [row_of[id(member)] for member in group.members]
        leader = row_of[id(group.leader)]
        member_rows += rows
        group_of_row += [index] * len(rows)
        leader_rows.append(leader)
        sizes.append(len(rows))
        for row in rows:
            source[row] = leader
    device = logits.device
    rows_and_groups = torch.tensor([member_rows, group_of_row], device=device)
    log_probs = logits[rows_and_groups[0]].log_softmax(dim=-1)
    sums = logits.new_zeros((len(groups), logits.shape[-1]))
    sums.index_add_(0, rows_and_groups[1], log_probs)
    combined = logits.clone()
    sizes_t = torch.tensor(sizes, dtype=logits.dtype, device=device)
    combined[torch.tensor(leader_rows, device=device)] = sums / sizes_t[:, None]
    return combined, torch.tensor(source, device=device)
