"""Clip-Cov / KL-Cov: the selected tokens, the loss and its gradient are the same for
(DP=1, one micro-batch), (DP=1, four micro-batches) and (DP=2, two micro-batches each), and the
per-micro-batch selection of public code gives a different token set on the same data.

Run under torchrun with 2 processes (gloo). Every rank builds the same mini-batch; the DP=1
layouts run on each rank alone (group=None), the DP=2 layout splits the sequences between the
ranks, rank 1 with more padding columns than rank 0 (padding must not matter); one case repeats
the first half of the sequences in the second so that KL-Cov must break ties across ranks.
Raises on failure; rank 0 prints one summary line per case.
"""
import torch
import torch.distributed as dist

from megatron_rl.algorithms import AlgorithmConfig, grpo_advantages, policy_loss, select_tokens

SEQUENCES, LENGTH, MICRO_BATCH = 16, 40, 4
# (duplicated halves, config). Duplicated halves: sequences 8-15 repeat 0-7, so every token ties
# with one on the other rank; an odd top-k count then must break a tie across ranks (lower global
# index, i.e. rank 0's copy, wins).
CASES = [
    # Clip-Cov with a candidate window the data populates; r * N ~ 9 tokens of ~450
    (False, dict(loss_mode="clip_cov", r=0.02, omega_low=0.3, omega_high=2.0,
                 aggregation="token-mean")),
    (False, dict(loss_mode="clip_cov", r=0.02, omega_low=0.3, omega_high=2.0,
                 aggregation="seq-mean-token-mean", cov_policy="rollout")),
    (False, dict(loss_mode="kl_cov", k=0.05, beta=1.0, aggregation="token-mean")),
    (False, dict(loss_mode="kl_cov", k=0.05, beta=1.0, aggregation="seq-mean-token-sum")),
    (True, dict(loss_mode="kl_cov", k=0.05, beta=1.0, aggregation="token-mean")),
]


def make_mini_batch(duplicated_halves):
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(10, LENGTH + 1, (SEQUENCES,), generator=g)
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    old = -torch.rand(SEQUENCES, LENGTH, generator=g, dtype=torch.float64) * 3
    # the current policy has moved a little since the rollout, and PPO clips some tokens
    current = old + 0.1 * torch.randn(SEQUENCES, LENGTH, generator=g, dtype=torch.float64)
    rewards = (torch.rand(SEQUENCES, generator=g) > 0.5).to(torch.float64)
    advantages = grpo_advantages(rewards, 4)[:, None].expand(SEQUENCES, LENGTH).contiguous()
    data = (current, old, advantages, mask)
    if duplicated_halves:
        half = SEQUENCES // 2
        data = tuple(torch.cat([t[:half], t[:half]]) for t in data)
    return data


def pad_columns(tensor, columns):
    padding = torch.zeros(tensor.shape[0], columns, dtype=tensor.dtype)
    return torch.cat([tensor, padding], dim=1)


def run_layout(config, data, micro_batches, group, num_tokens, num_sequences, seed):
    """Select once over this rank's share, then sum the micro-batch losses; returns
    (selected, loss summed over the micro-batches, gradient w.r.t. the current log-probs)."""
    current, old, advantages, mask = data
    logprobs = current.clone().requires_grad_()
    selected = select_tokens(config, current, old, advantages, mask, seed=seed, group=group)
    loss = 0
    for rows in torch.arange(current.shape[0]).split(current.shape[0] // micro_batches):
        piece, _ = policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], config,
                               selected=selected[rows], num_global_tokens=num_tokens,
                               num_global_sequences=num_sequences)
        loss = loss + piece
    loss.backward()
    return selected, loss.detach(), logprobs.grad


def per_micro_batch_public(config, data, micro_batch_rows, seed):
    """What public code does: Cov, N and the selection per micro-batch, on each GPU alone."""
    current, old, advantages, mask = data
    parts = [select_tokens(config, current[rows], old[rows], advantages[rows], mask[rows],
                           seed=seed) for rows in micro_batch_rows]
    return torch.cat(parts)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node 2"
    group = dist.group.WORLD
    share = SEQUENCES // world
    mine = slice(rank * share, (rank + 1) * share)
    extra_padding = 3 * rank

    for case_index, (duplicated_halves, case) in enumerate(CASES):
        full = make_mini_batch(duplicated_halves)
        mask = full[3]
        num_tokens, num_sequences = int(mask.sum()), int((mask.sum(-1) > 0).sum())
        local = tuple(pad_columns(t[mine], extra_padding) for t in full)
        if duplicated_halves:
            case = dict(case, k=7.5 / num_tokens)  # floor(k * N) = 7: one tie split by index
        config = AlgorithmConfig(**case)
        seed = 100 + case_index
        sel_1, loss_1, grad_1 = run_layout(config, full, 1, None, num_tokens, num_sequences, seed)
        sel_4, loss_4, grad_4 = run_layout(config, full, 4, None, num_tokens, num_sequences, seed)
        sel_r, loss_r, grad_r = run_layout(config, local, 2, group, num_tokens, num_sequences,
                                           seed)
        # reassemble the DP=2 results in global order, dropping each rank's extra padding
        sel_r, grad_r = sel_r[:, :LENGTH].contiguous(), grad_r[:, :LENGTH].contiguous()
        gathered_sel = [torch.empty_like(sel_r) for _ in range(world)]
        gathered_grad = [torch.empty_like(grad_r) for _ in range(world)]
        dist.all_gather(gathered_sel, sel_r)
        dist.all_gather(gathered_grad, grad_r)
        sel_2, grad_2 = torch.cat(gathered_sel), torch.cat(gathered_grad)
        loss_2 = loss_r.clone()
        dist.all_reduce(loss_2)

        count = int(sel_1.sum())
        name = f"{config.loss_mode}/{config.aggregation}/{config.cov_policy}"
        if duplicated_halves:
            name += "/tied across ranks"
            first, second = sel_1[:SEQUENCES // 2], sel_1[SEQUENCES // 2:]
            if count != 7 or int(first.sum()) != 4 or not (second <= first).all():
                raise AssertionError(f"{name}: ties not broken to the lower global index: "
                                     f"{sel_1.nonzero().tolist()}")
        if count == 0:
            raise AssertionError(f"{name}: nothing selected, the case tests nothing")
        if (sel_1 & ~mask).any():
            raise AssertionError(f"{name}: a padding token was selected")
        for label, sel, loss, grad in (("DP=1 x4 micro-batches", sel_4, loss_4, grad_4),
                                       ("DP=2 x2 micro-batches", sel_2, loss_2, grad_2)):
            if not torch.equal(sel, sel_1):
                raise AssertionError(f"{name}: {label} selects {sel.nonzero().tolist()}, "
                                     f"one micro-batch {sel_1.nonzero().tolist()}")
            if not torch.allclose(loss, loss_1, rtol=1e-13, atol=1e-15):
                raise AssertionError(f"{name}: {label} loss {loss.item()!r} != {loss_1.item()!r}")
            if not torch.allclose(grad, grad_1, rtol=1e-13, atol=1e-15):
                raise AssertionError(f"{name}: {label} gradient differs by "
                                     f"{(grad - grad_1).abs().max().item()}")

        # public systems: DP=2 ranks x 2 micro-batches of 4 sequences, each selecting alone
        rows = torch.arange(SEQUENCES).split(MICRO_BATCH)
        public = per_micro_batch_public(config, full, rows, seed)
        if torch.equal(public, sel_1):
            raise AssertionError(f"{name}: per-micro-batch selection equals the global one; "
                                 f"the data do not show the defect")
        current, old, advantages, _ = full
        public_loss, _ = policy_loss(current, old, advantages, mask, config, selected=public)
        if torch.allclose(public_loss, loss_1, rtol=1e-6):
            raise AssertionError(f"{name}: per-micro-batch loss equals the global loss")
        if rank == 0:
            overlap = int((public & sel_1).sum())
            loss_diff = max(abs(loss_4 - loss_1), abs(loss_2 - loss_1)).item()
            print(f"{name}: {count} tokens selected, identical in all 3 layouts; loss "
                  f"{loss_1.item():.12f} (max diff {loss_diff:.1e}); per-micro-batch selects "
                  f"{int(public.sum())} tokens, {overlap} shared, loss "
                  f"{public_loss.item():.12f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
