"""rt.shard in one process: each data-parallel rank simulated by its own Env (no process
group is needed when the plan carries the seed)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, TensorDataset

from overdrive.errors import OverdriveError
from overdrive.plan_spec import Parallel, Plan, resolve_for_world
from overdrive.rewrite.report import Report
from overdrive.runtime.sampling import shard_indices, sharded_len
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import env_for


def fake_rt(rank: int, size: int, plan: Plan | None = None) -> Runtime:
    plan = resolve_for_world(plan or Plan(seed=3), size)
    env = env_for(plan, rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu"))
    return Runtime(torch.nn.Linear(2, 2), plan=plan, report=Report([]), env=env)


def per_rank(size: int, make_loader, **kw) -> list[list[tuple[list[int], int]]]:
    out = []
    for r in range(size):
        loader = fake_rt(r, size).shard(make_loader(), **kw)
        out.append([(b[0].tolist(), loader.n_real) for b in loader])
        assert len(loader) == len(out[-1]), "len() must equal the number of batches"
    return out


def real(batches) -> list[int]:
    return [v for values, n in batches for v in values[:n]]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 37])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("kw", [{}, {"even_batches": False}, {"split_batches": True},
                                {"split_batches": True, "even_batches": False}])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_and_len_right(n, size, kw, drop_last):
    bs = 6 if kw.get("split_batches") else 4
    if kw.get("split_batches") and bs % size:
        bs = 2 * size
    ds = TensorDataset(torch.arange(n))
    ranks = per_rank(size, lambda: DataLoader(ds, batch_size=bs, shuffle=True,
                                              drop_last=drop_last), **kw)
    seen = [v for r in ranks for v in real(r)]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == list(range(n))
    elif kw.get("split_batches") or not kw.get("even_batches", True):
        assert len(seen) == (n // bs) * bs  # every full batch, nothing else
    else:  # even_batches + drop_last: an incomplete group of batches is dropped everywhere
        assert len(seen) == (n // bs) // size * size * bs
    if kw.get("even_batches", True):
        assert len({len(r) for r in ranks}) == 1
        assert len({len(v) for r in ranks for v, _ in r}) <= 1


def test_shuffle_same_permutation_everywhere_and_set_epoch_changes_it():
    ds = TensorDataset(torch.arange(20))
    a = fake_rt(0, 1).shard(DataLoader(ds, batch_size=5, shuffle=True))
    b = fake_rt(0, 1).shard(DataLoader(ds, batch_size=5, shuffle=True))
    first = [x[0].tolist() for x in a]
    assert first == [x[0].tolist() for x in b]
    assert sorted(sum(first, [])) == list(range(20)) and first[0] != [0, 1, 2, 3, 4]
    second = [x[0].tolist() for x in a]  # a full pass advanced the epoch
    assert second != first and a.epoch == 2
    b.set_epoch(1)
    assert [x[0].tolist() for x in b] == second


def test_resume_skips_without_reading_and_state_round_trips():
    ds = TensorDataset(torch.arange(30))
    ref = fake_rt(0, 1).shard(DataLoader(ds, batch_size=3, shuffle=True))
    want = [x[0].tolist() for x in ref]
    part = fake_rt(0, 1).shard(DataLoader(ds, batch_size=3, shuffle=True))
    it = iter(part)
    for _ in range(4):
        next(it)
    state = part.state_dict()
    assert state["position"] == 4 and state["epoch"] == 0
    resumed = fake_rt(0, 1, Plan(seed=99)).shard(DataLoader(ds, batch_size=3, shuffle=True))
    resumed.load_state_dict(state)  # the seed travels with the state
    assert [x[0].tolist() for x in resumed] == want[4:]


def test_custom_batch_sampler_and_sampler():
    class Reversed(Sampler[int]):
        def __init__(self, n):
            self.n = n

        def __iter__(self):
            return iter(range(self.n - 1, -1, -1))

        def __len__(self):
            return self.n

    ds = TensorDataset(torch.arange(10))
    ranks = per_rank(2, lambda: DataLoader(ds, batch_size=2, sampler=Reversed(10)))
    assert ranks[0][0][0] == [9, 8] and ranks[1][0][0] == [7, 6]
    bsampler = BatchSampler(SequentialSampler(range(10)), batch_size=5, drop_last=False)
    ranks = per_rank(2, lambda: DataLoader(ds, batch_sampler=bsampler))
    assert ranks == [[([0, 1, 2, 3, 4], 5)], [([5, 6, 7, 8, 9], 5)]]


def test_collate_fn_and_device_placement_kept():
    ds = [{"x": torch.tensor([i])} for i in range(4)]
    rt = fake_rt(0, 1)
    loader = rt.shard(DataLoader(ds, batch_size=2, collate_fn=lambda b: {"n": len(b),
                                                                         "x": [d["x"] for d in b]}))
    batches = list(loader)
    assert batches[0]["n"] == 2 and batches[0]["x"][0].device == rt.device


def test_split_batches_not_divisible_is_refused():
    with pytest.raises(OverdriveError, match="not divisible by the 2 data-parallel ranks"):
        fake_rt(0, 2).shard(DataLoader(TensorDataset(torch.arange(9)), batch_size=3),
                            split_batches=True)


def test_tensor_parallel_peers_get_the_same_batch():
    plan = Plan(seed=1, parallel=Parallel(dp_shard=2, tp=2))
    ds = TensorDataset(torch.arange(8))
    got = {}
    for rank in range(4):
        plan_w = resolve_for_world(plan, 4)
        env = env_for(plan_w, rank=rank, local_rank=rank, world_size=4, device=torch.device("cpu"))
        rt = Runtime(torch.nn.Linear(2, 2), plan=plan_w, report=Report([]), env=env)
        got[rank] = [b[0].tolist() for b in rt.shard(DataLoader(ds, batch_size=2))]
    assert got[0] == got[1] and got[2] == got[3] and got[0] != got[2]


def test_sharded_len_matches_shard_indices():
    for n_items in range(0, 30):
        for size in (1, 2, 3, 4):
            for split in (False, True):
                for even in (False, True):
                    for drop_last in (False, True):
                        bs = 4 if not split else 4 * (1 if size in (1, 2, 4) else 0) or 6
                        if split and bs % size:
                            continue
                        batches = list(BatchSampler(range(n_items), bs, drop_last))
                        last = len(batches[-1]) if batches else 0
                        for rank in range(size):
                            got = list(shard_indices(batches, rank, size, split=split, even=even,
                                                     batch_size=bs, drop_last=drop_last))
                            assert len(got) == sharded_len(
                                len(batches), last, rank, size, split=split, even=even,
                                batch_size=bs, drop_last=drop_last), (n_items, size, split,
                                                                       even, drop_last, rank)


@pytest.mark.parametrize("dispatch", [True, False])
def test_iterable_resume_in_one_process(dispatch):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(9).split(1))

    def make():
        return fake_rt(0, 1).shard(DataLoader(Stream(), batch_size=2), dispatch=dispatch)

    want = [b.flatten().tolist() for b in make()]
    assert want == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]  # one rank: never padded
    part = make()
    it = iter(part)
    next(it), next(it)
    resumed = make()
    resumed.load_state_dict(part.state_dict())
    assert [b.flatten().tolist() for b in resumed] == want[2:]
    assert resumed.n_real == 1 and resumed.end_of_epoch


def take(loader, n: int) -> list[list[int]]:
    """The real items of ``loader``'s next ``n`` batches (the iterator is left open)."""
    it = iter(loader)
    out = []
    for _ in range(n):
        batch = next(it)
        values = (batch[0] if isinstance(batch, (list, tuple)) else batch).flatten().tolist()
        out.append(values[:loader.n_real])
    return out


@pytest.mark.parametrize("split", [False, True])
def test_resume_on_fewer_ranks_continues_with_exactly_the_unconsumed_samples(split):
    ds = TensorDataset(torch.arange(50))
    make = lambda: DataLoader(ds, batch_size=4, shuffle=True)  # noqa: E731
    order = [v for (b,) in fake_rt(0, 1).shard(make()) for v in b.tolist()]  # one permutation
    two = [fake_rt(r, 2).shard(make(), split_batches=split) for r in range(2)]
    consumed = [v for ld in two for b in take(ld, 3) for v in b]
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    assert state["global_batches"] == (3 if split else 6) and state["dp_size"] == 2
    one = fake_rt(0, 1).shard(make())
    one.load_state_dict(state)
    rest = [v for (b,) in one for v in b.tolist()]
    assert sorted(consumed + rest) == list(range(50)) and not set(consumed) & set(rest)
    assert rest == order[len(consumed):]  # the uninterrupted order, from where it stopped


def test_resume_on_more_ranks_deals_out_the_rest():
    ds = TensorDataset(torch.arange(50))
    make = lambda: DataLoader(ds, batch_size=4, shuffle=True)  # noqa: E731
    one = fake_rt(0, 1).shard(make())
    consumed = [v for b in take(one, 3) for v in b]
    state = one.state_dict()
    rest = []
    for r in range(2):
        ld = fake_rt(r, 2).shard(make())
        ld.load_state_dict(state)
        rest += [v for (b,) in ld for v in b.tolist()[:ld.n_real]]
    assert sorted(consumed + rest) == list(range(50)) and len(rest) == 50 - 12


def test_iterable_resume_on_fewer_ranks():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(21).split(1))

    make = lambda: DataLoader(Stream(), batch_size=2)  # noqa: E731
    two = [fake_rt(r, 2).shard(make(), dispatch=False) for r in range(2)]
    consumed = [v for ld in two for b in take(ld, 2) for v in b]
    for dispatch in (False, True):
        one = fake_rt(0, 1).shard(make(), dispatch=dispatch)
        one.load_state_dict(two[1].state_dict())
        rest = [v for b in one for v in b.flatten().tolist()]
        assert rest == list(range(8, 21)) and sorted(consumed) == list(range(8))


def test_resume_with_another_batch_size_converts_or_refuses():
    ds = TensorDataset(torch.arange(24))
    first = fake_rt(0, 1).shard(DataLoader(ds, batch_size=2))
    take(first, 3)  # 6 samples
    state = first.state_dict()
    three = fake_rt(0, 1).shard(DataLoader(ds, batch_size=3))
    three.load_state_dict(state)
    assert next(iter(three))[0].tolist() == [6, 7, 8]
    four = fake_rt(0, 1).shard(DataLoader(ds, batch_size=4))
    with pytest.raises(OverdriveError, match="batch_size=2 .6 samples.*batch_size=4"):
        four.load_state_dict(state)


def test_a_state_saved_before_global_positions_still_loads():
    ds = TensorDataset(torch.arange(12))
    ld = fake_rt(0, 1).shard(DataLoader(ds, batch_size=2))
    ld.load_state_dict({"epoch": 0, "position": 2, "seed": 3})
    assert [b[0].tolist() for b in ld][0] == [4, 5]


def test_positions_kept_by_load_go_to_the_loaders_sharded_after_it():
    ds = TensorDataset(torch.arange(12))
    rt = fake_rt(0, 1)
    saved = [{"epoch": 0, "seed": 3, "global_batches": 2, "batch_size": 2, "dp_size": 1},
             {"epoch": 1, "seed": 3, "global_batches": 1, "batch_size": 3, "dp_size": 1}]
    rt._pending_loader_states = list(saved)  # what rt.load leaves when no loader exists yet
    train = rt.shard(DataLoader(ds, batch_size=2))
    evals = rt.shard(DataLoader(ds, batch_size=3))
    assert train.state_dict()["global_batches"] == 2 and evals.state_dict()["epoch"] == 1
    assert next(iter(train))[0].tolist() == [4, 5] and next(iter(evals))[0].tolist() == [3, 4, 5]
    assert rt._pending_loader_states == []
    assert rt.shard(DataLoader(ds, batch_size=2)).state_dict()["global_batches"] == 0


def test_resharding_the_same_loader_replaces_its_slot():
    ds = TensorDataset(torch.arange(8))
    rt = fake_rt(0, 1)
    train_base, eval_base = DataLoader(ds, batch_size=2), DataLoader(ds, batch_size=4)
    train = rt.shard(train_base)
    for _ in range(3):  # an eval loader sharded at every evaluation
        evals = rt.shard(eval_base)
        assert [b[0].tolist() for b in evals] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rt._loaders == [train, evals]
    again = rt.shard(train_base)
    assert rt._loaders == [again, evals]


def test_gather_for_metrics_trims_the_outer_loader_after_a_nested_loop():
    rt = fake_rt(1, 2)
    train = rt.shard(DataLoader(TensorDataset(torch.arange(5)), batch_size=2))
    evals = rt.shard(DataLoader(TensorDataset(torch.arange(4)), batch_size=2))
    got = []
    for (x,) in train:
        for _ in evals:
            pass
        got.append(rt.gather_for_metrics(x).tolist())  # one rank, no process group
    assert got == [[2, 3], []]  # rank 1's second batch is all wrap-around padding


class Shuffled(torch.utils.data.RandomSampler):
    """A RandomSampler subclass (not replaced by the seeded one, but seeded through its
    generator)."""


def random_samplers():
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    return {"subset": lambda: SubsetRandomSampler(list(range(0, 40, 2))),
            "weighted": lambda: WeightedRandomSampler([1.0] * 10 + [3.0] * 10, 20),
            "subclass": lambda: Shuffled(range(20))}


@pytest.mark.parametrize("kind", ["subset", "weighted", "subclass"])
def test_random_samplers_draw_one_global_order_and_resume_exactly(kind):
    ds = TensorDataset(torch.arange(40))
    make = lambda: DataLoader(ds, batch_size=2, sampler=random_samplers()[kind]())  # noqa: E731
    one = fake_rt(0, 1).shard(make())
    order = [b[0].tolist() for b in one]
    second = [b[0].tolist() for b in one]
    assert second != order  # each epoch its own draw
    ranks = [[b[0].tolist() for b in fake_rt(r, 2).shard(make())] for r in range(2)]
    assert [b for pair in zip(*ranks) for b in pair] == order  # the same global order
    part = fake_rt(0, 1).shard(make())
    take(part, 3)
    resumed = fake_rt(0, 1).shard(make())
    resumed.load_state_dict(part.state_dict())
    assert [b[0].tolist() for b in resumed] == order[3:]
    later = fake_rt(0, 1).shard(make())
    later.set_epoch(1)
    assert [b[0].tolist() for b in later] == second


def test_a_distributed_sampler_is_refused():
    from torch.utils.data import DistributedSampler

    ds = TensorDataset(torch.arange(8))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0)
    with pytest.raises(OverdriveError, match="DistributedSampler.*Pass the plain loader"):
        fake_rt(0, 2).shard(DataLoader(ds, batch_size=2, sampler=sampler))


class NumberStream(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n).split(1))


def test_iterable_without_dispatch_and_two_workers_gives_every_sample_once():
    seen, lens = [], []
    for r in range(2):
        loader = fake_rt(r, 2).shard(DataLoader(NumberStream(23), batch_size=3, num_workers=2),
                                     dispatch=False)
        batches = [(b.flatten().tolist(), loader.n_real) for b in loader]
        seen += real(batches)
        lens.append(len(batches))
    assert sorted(seen) == list(range(23)) and lens[0] == lens[1]


def test_resumed_iterable_with_persistent_workers_reads_the_next_epoch_whole():
    make = lambda: fake_rt(0, 1).shard(  # noqa: E731
        DataLoader(NumberStream(8), batch_size=2, num_workers=2, persistent_workers=True),
        dispatch=False)
    part = make()
    take(part, 2)
    resumed = make()
    resumed.load_state_dict(part.state_dict())
    assert [b.flatten().tolist() for b in resumed] == [[4, 5], [6, 7]]
    assert [b.flatten().tolist() for b in resumed] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_dispatch_true_on_map_style_data_is_refused():
    with pytest.raises(OverdriveError, match=r"dispatch=True.*map-style.*dispatch=None"):
        fake_rt(0, 2).shard(DataLoader(TensorDataset(torch.arange(4)), batch_size=2),
                            dispatch=True)
    fake_rt(0, 2).shard(DataLoader(TensorDataset(torch.arange(4)), batch_size=2),
                        dispatch=False)  # what happens anyway: accepted


def test_in_order_false_is_not_kept(caplog):
    ds = TensorDataset(torch.arange(10))
    with caplog.at_level("INFO", logger="overdrive"):
        loader = fake_rt(0, 1).shard(DataLoader(ds, batch_size=2, num_workers=2,
                                                in_order=False))
    assert loader.loader.in_order is True and "in_order=False is not kept" in caplog.text
    assert [b[0].tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_len_with_a_custom_batch_sampler_of_full_batches_is_exact():
    class Pairs(Sampler[list]):  # no sampler attribute: its batches are taken as full
        batch_size = 2

        def __iter__(self):
            return iter([[i, i + 1] for i in range(0, 12, 2)])

        def __len__(self):
            return 6

    ds = TensorDataset(torch.arange(12))
    for kw in ({}, {"split_batches": True, "even_batches": False}):
        for r in range(2):
            loader = fake_rt(r, 2).shard(DataLoader(ds, batch_sampler=Pairs()), **kw)
            assert len(loader) == len(list(loader))


def test_set_epoch_to_another_epoch_starts_its_position_at_zero():
    ld = fake_rt(0, 1).shard(DataLoader(TensorDataset(torch.arange(12)), batch_size=2))
    ld.load_state_dict({"epoch": 0, "seed": 3, "global_batches": 4, "batch_size": 2,
                        "dp_size": 1})
    ld.set_epoch(0)  # the loaded epoch: position kept
    assert ld.state_dict()["global_batches"] == 4
    ld.set_epoch(1)
    assert ld.state_dict()["global_batches"] == 0 and ld.state_dict()["epoch"] == 1


def test_rt_load_before_rt_shard_restores_the_position(tmp_path):
    import overdrive as od

    ds = TensorDataset(torch.arange(20))
    make = lambda: DataLoader(ds, batch_size=2, shuffle=True)  # noqa: E731
    rt = od.accelerate(torch.nn.Linear(2, 2), od.Plan(seed=5))
    loader = rt.shard(make())
    order = [b[0].tolist() for b in rt.shard(make())]
    take(loader, 3)
    rt.save(tmp_path / "ck")
    fresh = od.accelerate(torch.nn.Linear(2, 2), od.Plan(seed=5))
    fresh.load(tmp_path / "ck")  # no loader yet: the position waits for rt.shard
    resumed = fresh.shard(make())
    assert [b[0].tolist() for b in resumed] == order[3:]


def test_shuffle_without_a_seed_follows_torch_manual_seed():
    """No Plan.seed, no generator: torch.manual_seed fixes the order, as for DataLoader."""
    import overdrive as od

    ds = TensorDataset(torch.arange(40))

    def order(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        rt = od.accelerate(torch.nn.Linear(2, 2))
        return [b[0].tolist() for b in rt.shard(DataLoader(ds, batch_size=4, shuffle=True))]

    assert order(0) == order(0)
    assert order(0) != order(1)
