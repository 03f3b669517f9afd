"""EMA switched on for a run whose checkpoints were saved without it: they still load.

A TP2 x DP2 world (4 gloo ranks) trains two steps without EMA and saves; the same run is then
rebuilt with ``optimizer.ema_decay`` set and resumes from that checkpoint: it loads (rather than
failing in DCP on the missing ``optim/*/ema`` entries), the EMA equals the loaded fp32 master
weights, rank 0 logs one line saying so, and the next step moves the EMA by ``1 - decay`` of the
way to the new master. Then the other way: a checkpoint with EMA loads into a run without it.
"""

from __future__ import annotations

from tests.helpers.consumers import spawn


def _worker(rank: int, world: int, root: str) -> dict:
    import logging

    import torch

    from consumers.checkpoint import CheckpointConfig, CheckpointManager
    from consumers.parallel import ParallelLayout
    from tests.consumers.ckpt_workers import OPT, OPT_EMA, _engine, _run

    layout = ParallelLayout(tp=2, dp=2)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("consumers.checkpoint").addHandler(handler)
    logging.getLogger("consumers.checkpoint").setLevel(logging.INFO)

    pstate, plain = _engine(layout, optimizer=OPT, perturb=True)
    _run(plain, pstate, [0, 1])
    CheckpointManager(CheckpointConfig(dir=f"{root}/no-ema"), pstate).save(2, plain, {})

    pstate, with_ema = _engine(layout, optimizer=OPT_EMA)
    meta = CheckpointManager(CheckpointConfig(dir=f"{root}/no-ema"), pstate).load_latest(with_ema)
    opt = with_ema.optimizer
    ema_is_master = all(torch.equal(opt.ema[s.name], opt.master[s.name]) for s in opt.shards)
    master_before = {s.name: opt.master[s.name].clone() for s in opt.shards}
    _run(with_ema, pstate, [2])
    decay = OPT_EMA.ema_decay
    ema_follows = all(
        torch.allclose(opt.ema[s.name], master_before[s.name].lerp(opt.master[s.name], 1 - decay), atol=1e-7)
        for s in opt.shards
    )
    CheckpointManager(CheckpointConfig(dir=f"{root}/ema"), pstate).save(3, with_ema, {})

    pstate, plain_again = _engine(layout, optimizer=OPT)
    meta_back = CheckpointManager(CheckpointConfig(dir=f"{root}/ema"), pstate).load_latest(plain_again)
    return {
        "step": meta["step"],
        "ema_is_master": ema_is_master,
        "ema_follows": ema_follows,
        "moved": not all(torch.equal(opt.ema[s.name], master_before[s.name]) for s in opt.shards),
        "step_back": meta_back["step"],
        "messages": messages,
    }


def test_ema_switched_on_starts_from_the_loaded_master(tmp_path):
    results = spawn(_worker, 4, tmp_path / "w", str(tmp_path / "ckpt"))
    for rank, r in results.items():
        assert r["step"] == 2 and r["step_back"] == 3, (rank, r)
        assert r["ema_is_master"] and r["ema_follows"] and r["moved"], (rank, r)
    said = [m for m in results[0]["messages"] if "EMA" in m]
    assert len(said) == 2, said
    assert "holds no EMA weights (saved with optimizer.ema_decay=0): the EMA starts from its master weights" in said[0]
    assert "holds EMA weights; optimizer.ema_decay=0 drops them" in said[1]
    assert not any(results[rank]["messages"] for rank in results if rank != 0)  # rank 0 says it, once
