"""add_items: items the model has never seen, composed from their attributes at the node (serving/compose.py) and
recommended at once: scored as the trainer's rule says, selected by category filters, hidden by stock and exclude,
the result cache dropped, bad batches refused whole, kept across a model swap and a restart (the added-items file),
counted by health; and over a real daemon socket."""
from __future__ import annotations

import asyncio
import collections
import json
import shutil
import threading

import numpy as np
import pytest

from edge_runtime import const
from edge_runtime.client import Client, RpcError
from edge_runtime.errors import EdgeRuntimeError, InvalidParams, SwapError
from edge_runtime.scoring.quantize import quantize_rows
from edge_runtime.serving.compose import compose_items
from edge_runtime.serving.model import Model
from edge_runtime.serving.service import Service
from edge_runtime.serving.swap import ModelSwapper


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def model(tiny_bundle) -> Model:
    return Model(tiny_bundle)


def item_attrs(m: Model, bundle, row: int) -> tuple[str, ...]:
    codes = np.load(bundle / "item_attr_codes.npy")
    return tuple(sorted({m.attr_names[c] for c in codes[m.attr_indptr[row]:m.attr_indptr[row + 1]]}))


@pytest.fixture(scope="module")
def attr_sets(model, tiny_bundle) -> dict[tuple[str, ...], list[int]]:
    """Exact attribute sets (of >= 2 values) -> the trained rows having exactly that set, most common first."""
    codes = np.load(tiny_bundle / "item_attr_codes.npy")
    ind = model.attr_indptr
    sets: dict[tuple, list[int]] = collections.defaultdict(list)
    for r in range(model.num_items):
        sets[tuple(sorted({model.attr_names[c] for c in codes[ind[r]:ind[r + 1]]}))].append(r)
    return dict(sorted(((k, v) for k, v in sets.items() if len(k) >= 2 and len(v) >= 3), key=lambda kv: -len(kv[1])))


def trimmed_bundle(src, dst, drop_compose: bool = False, version: str = "trimmed-1"):
    """A copy of ``src`` without its last item (and without the compose arrays when asked), under another version:
    an older model that has not seen that item. Loaded with ``verify=False`` (its checksums are the old ones)."""
    shutil.copytree(src, dst)
    ids = json.loads((dst / "item_ids.json").read_text())
    (dst / "item_ids.json").write_text(json.dumps(ids[:-1]))
    for name in ("items.i8.npy", "items.scale.npy", "items.f32.npy", "popularity.npy"):
        np.save(dst / name, np.load(dst / name)[:-1])
    ind = np.load(dst / "item_attr_indptr.npy")
    np.save(dst / "item_attr_indptr.npy", ind[:-1])
    np.save(dst / "item_attr_codes.npy", np.load(dst / "item_attr_codes.npy")[:ind[-2]])
    man = json.loads((dst / "manifest.json").read_text())
    man["model_version"] = version
    if drop_compose:
        for name in ("item_attr_emb.npy", "item_id_mean.npy"):
            (dst / name).unlink()
            man["files"].pop(name)
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.fixture(scope="module")
def older(tiny_bundle, tmp_path_factory) -> Model:
    return Model(trimmed_bundle(tiny_bundle, tmp_path_factory.mktemp("older") / "b"), verify=False)


def run(service: Service, coro):
    try:
        return asyncio.run(coro)
    finally:
        service.executor.shutdown(wait=True)


async def boot(service: Service, m: Model) -> ModelSwapper:
    swapper = ModelSwapper(service)
    async with swapper.lock():
        await swapper.activate(m, "boot")
    return swapper


def served_row(m: Model, item: str) -> np.ndarray:
    r = m.index[item]
    return m.items[r].astype(np.float32) * (m.scales[r] if m.scales is not None else 1.0)


# ------------------------------------------------------------------------------------------------------ the rule
def test_tiny_bundle_carries_compose_arrays_of_the_trainers_rule(model, tiny_bundle):
    """The trained rows are id_emb[i] + mean(attr_emb[attrs(i)]) and id_mean is the mean id row, so composing every
    trained item from its own attributes must leave residuals (trained - composed = id_emb[i] - id_mean) that
    average to zero, while each single residual is far from zero (the id part is real)."""
    assert model.attr_emb is not None and model.attr_emb.shape == (len(model.attr_names), model.dim)
    f32 = np.load(tiny_bundle / "items.f32.npy")
    composed, known = model.compose([item_attrs(model, tiny_bundle, r) for r in range(model.num_items)])
    resid = f32 - composed
    assert np.abs(resid.mean(axis=0)).max() < 1e-4
    assert np.linalg.norm(resid, axis=1).mean() > 0.05
    assert (known == np.diff(model.attr_indptr)).mean() > 0.99   # every value of a trained item is known


# ------------------------------------------------------------------------------------------------------ scoring
def test_new_item_is_recommended_with_the_composed_score(model, attr_sets):
    service = Service(None)
    n = model.num_items
    cands = list(attr_sets.items())[:10]

    async def go():
        await boot(service, model)
        ranks = []
        for j, (attrs, rows) in enumerate(cands):
            other = next(k for k in attr_sets if not set(k) & set(attrs))
            res = await service.add_items({"items": [{"id": f"new-{j}", "attributes": list(attrs)},
                                                     {"id": f"other-{j}", "attributes": list(other)}]})
            assert res == {"ok": True, "added": 2, "updated": 0, "known": [],
                           "composed_from": {f"new-{j}": len(attrs), f"other-{j}": len(other)}}
        m = service.model
        assert m.num_added == 2 * len(cands) and m.bundle_items == n
        for j, (attrs, rows) in enumerate(cands):
            u = m.encode(rows[:5])
            sc = (m.items.astype(np.float32) * m.scales[:, None]) @ u
            sc[rows[:5]] = -np.inf                      # exclude_seen
            ranks.append((int((sc > sc[m.index[f"new-{j}"]]).sum()), int((sc > sc[m.index[f"other-{j}"]]).sum())))
        # items sharing the history's attributes rank far above ones with unrelated attributes
        assert sum(a < b for a, b in ranks) >= 9, ranks
        assert np.median([a for a, _ in ranks]) < n / 4, ranks
        # the best of them is served at that rank with the score the composed vector gives
        j = int(np.argmin([a for a, _ in ranks]))
        attrs, rows = cands[j]
        assert ranks[j][0] < const.MAX_K
        hist = [model.item_ids[r] for r in rows[:5]]
        res = await service.recommend({"history": hist, "k": const.MAX_K})
        assert res["source"] == "model" and res["ignored"] == []
        pos = res["items"].index(f"new-{j}")
        assert abs(pos - ranks[j][0]) <= 2   # ties / float order only
        u = model.encode(rows[:5])
        v, known = compose_items([attrs], {a: i for i, a in enumerate(model.attr_names)}, model.attr_emb,
                                 model.id_mean, model.item_mean())
        exact = float(u @ v[0])
        step = np.abs(v[0]).max() / 127   # int8 row step: each element is off by at most half of it
        assert abs(res["scores"][pos] - exact) <= 0.5 * step * np.abs(u).sum() + 1e-5, (res["scores"][pos], exact)
        assert abs(exact) > 10 * 0.5 * step * np.abs(u).sum()   # the tolerance is small against the score
        assert np.allclose(served_row(service.model, f"new-{j}"), v[0], atol=step / 2 + 1e-7)

    run(service, go())


def test_served_path_unchanged_without_added_items(model):
    """No item added: the model served is the bundle's own object (no copy, no re-composition on swap)."""
    service = Service(None)

    async def go():
        await boot(service, model)
        assert service.model is model and service.with_added(model) is model
        assert service.health({})["added_items"] == 0

    run(service, go())


def test_history_of_added_items_is_excluded_not_encoded(model):
    service = Service(None)

    async def go():
        await boot(service, model)
        await service.add_items({"items": [{"id": "fresh", "attributes": ["17"]}]})
        res = await service.recommend({"history": ["fresh"], "k": 10})
        pop = await service.recommend({"k": 10, "history": ["nobody-knows"]})
        assert res["source"] == "popularity" and res["ignored"] == [] and "fresh" not in res["items"]
        assert res["items"] == pop["items"]
        both = await service.recommend({"history": [model.item_ids[5], "fresh"], "k": 10, "exclude_seen": False})
        alone = await service.recommend({"history": [model.item_ids[5]], "k": 10, "exclude_seen": False})
        assert both["source"] == "model" and both["scores"] == alone["scores"]   # the user vector ignores it

    run(service, go())


def test_fp32_precision_stores_the_composed_row_exactly(tiny_bundle):
    m = Model(tiny_bundle, precision="fp32")
    service = Service(None)

    async def go():
        await boot(service, m)
        await service.add_items({"items": [{"id": "f", "attributes": ["17", "2"]}]})
        v, _ = m.compose([("17", "2")])
        assert service.model.scales is None and service.model.items.dtype == np.float32
        assert np.array_equal(service.model.items[service.model.index["f"]], v[0])

    run(service, go())


def test_without_compose_arrays_a_new_item_gets_the_mean_item_embedding(tiny_bundle, tmp_path):
    m = Model(trimmed_bundle(tiny_bundle, tmp_path / "b", drop_compose=True), verify=False)
    assert m.attr_emb is None and m.summary()["can_compose"] is False
    service = Service(None)

    async def go():
        await boot(service, m)
        res = await service.add_items({"items": [{"id": "plain", "attributes": ["17", "2"]}]})
        assert res["composed_from"] == {"plain": 0}
        mean = (np.load(tmp_path / "b" / "items.f32.npy")).mean(axis=0)
        step = np.abs(mean).max() / 127
        assert np.allclose(served_row(service.model, "plain"), mean, atol=step / 2 + 2e-3)   # int8 items' mean
        res = await service.recommend({"history": [m.item_ids[0]], "k": 5, "filters": {"category": "17"}})
        assert res["items"]                                   # its attributes still feed the category filter

    run(service, go())


# ------------------------------------------------------------------------------------------------------ filters
def test_category_filter_stock_and_exclude_apply_to_added_items(model):
    service = Service(None)
    value = next(v for v, r in model.attr_rows.items() if 20 <= len(r) <= 200)   # a category of a few items
    brand_rows = model.attr_rows[value]

    async def go():
        await boot(service, model)
        service.set_availability({"items": ["later"], "in_stock": False})   # before the node knows it
        await service.add_items({"items": [{"id": "only", "attributes": [value, "brand-new-line"]},
                                           {"id": "later", "attributes": ["brand-new-line"]}]})
        hist = [model.item_ids[0]]
        res = await service.recommend({"history": hist, "k": 10, "filters": {"category": "brand-new-line"}})
        assert res["items"] == ["only"]                       # "later" is out of stock, no other item has the value
        wide = await service.recommend({"history": hist, "k": const.MAX_K, "filters": {"category": [value]},
                                        "exclude_seen": False})
        assert "only" in wide["items"] and "later" not in wide["items"]
        assert len(wide["items"]) == len(brand_rows) + 1
        assert all(service.model.index[i] in set(brand_rows.tolist()) | {service.model.index["only"]}
                   for i in wide["items"])
        service.set_availability({"items": ["only"], "in_stock": False})
        assert (await service.recommend({"history": hist, "k": 10,
                                         "filters": {"category": "brand-new-line"}}))["items"] == []
        service.set_availability({"items": ["only", "later"], "in_stock": True})
        back = await service.recommend({"history": hist, "k": 10, "filters": {"category": "brand-new-line"}})
        assert sorted(back["items"]) == ["later", "only"]
        ex = await service.recommend({"history": hist, "k": 10, "filters": {"category": "brand-new-line",
                                                                              "exclude": ["only"]}})
        assert ex["items"] == ["later"]
        seen = await service.recommend({"history": hist + ["only"], "k": 10,
                                        "filters": {"category": "brand-new-line"}})
        assert seen["items"] == ["later"]                     # exclude_seen covers added items

    run(service, go())


def test_a_model_without_attributes_gains_category_filters_from_added_items(tiny_bundle, tmp_path):
    dst = trimmed_bundle(tiny_bundle, tmp_path / "b", drop_compose=True)
    for name in ("item_attr_indptr.npy", "item_attr_codes.npy", "item_attr_names.json"):
        (dst / name).unlink()
    m = Model(dst, verify=False)
    service = Service(None)

    async def go():
        await boot(service, m)
        with pytest.raises(InvalidParams, match="no item attributes"):
            await service.recommend({"history": [m.item_ids[0]], "filters": {"category": "x"}})
        await service.add_items({"items": [{"id": "n1", "attributes": ["x"]}]})
        res = await service.recommend({"history": [m.item_ids[0]], "filters": {"category": "x"}})
        assert res["items"] == ["n1"]

    run(service, go())


# ------------------------------------------------------------------------------------------------------ cache
def test_add_items_invalidates_cached_results(model, attr_sets):
    service = Service(None)
    attrs, rows = next(iter(attr_sets.items()))

    async def go():
        await boot(service, model)
        for r in rows[:5]:
            service.track({"user": "u1", "item": model.item_ids[r], "event": "view"})
        # the category of the set with the fewest items: all of them (and the new item) fit in one reply
        rare = min(attrs, key=lambda v: len(model.attr_rows[v]))
        assert len(model.attr_rows[rare]) < const.MAX_K
        req = {"user": "u1", "k": const.MAX_K, "filters": {"category": rare}}
        first = await service.recommend(dict(req))
        hits = service.cache.hits
        assert await service.recommend(dict(req)) is first and service.cache.hits == hits + 1
        await service.add_items({"items": [{"id": "hot", "attributes": list(attrs)}]})
        assert len(service.cache) == 0
        after = await service.recommend(dict(req))
        assert service.cache.hits == hits + 1 and after is not first
        assert "hot" in after["items"] and "hot" not in first["items"]

    run(service, go())


def test_result_scored_before_an_add_is_not_cached_after_it(model):
    """A recommend whose scan ran on the model before add_items must not refill the cache when it finishes after."""
    service = Service(None)
    service.score_inline = "never"   # the scan runs in a thread, so add_items can run while it is held
    gate = threading.Event()

    async def go():
        await boot(service, model)
        service.track({"user": "u", "item": model.item_ids[3], "event": "view"})
        real = service._score_jobs

        def slow(*a):
            gate.wait(10)
            return real(*a)

        service._score_jobs = slow
        pending = asyncio.ensure_future(service.recommend({"user": "u", "k": 5}))
        await asyncio.sleep(0.05)
        await service.add_items({"items": [{"id": "mid", "attributes": ["17"]}]})
        gate.set()
        reply = await pending
        service._score_jobs = real
        assert reply["model_version"] == model.version and len(reply["items"]) == 5   # the scan did finish
        assert len(service.cache) == 0

    run(service, go())


# ------------------------------------------------------------------------------------------------------ params
@pytest.mark.parametrize("params, words", [
    ({}, "missing required parameter 'items'"),
    ({"items": [], "extra": 1}, "unknown parameter"),
    ({"items": {"id": "a"}}, "'items' must be an array"),
    ({"items": [{"id": str(i)} for i in range(const.MAX_ADD_ITEMS + 1)]}, "holds 1001 items; at most 1000 per call"),
    ({"items": [{"id": "a"}, "b"]}, "items[1] must be a map"),
    ({"items": [{"id": "a"}, {"attributes": ["x"]}]}, "items[1]: missing required parameter 'id'"),
    ({"items": [{"id": "a", "brand": "x"}]}, "items[0]: unknown parameter"),
    ({"items": [{"id": "a"}, {"id": 1.5}]}, "'items[1].id' must be a string or an integer id"),
    ({"items": [{"id": "x" * (const.MAX_ID_CHARS + 1)}]}, "'items[0].id' must be 1 to 256"),
    ({"items": [{"id": "a", "attributes": "17"}]}, "'items[0].attributes' must be an array of strings"),
    ({"items": [{"id": "a", "attributes": ["17", 2]}]}, "'items[0].attributes[1]' must be a non-empty string"),
    ({"items": [{"id": "a", "attributes": [""]}]}, "'items[0].attributes[0]' must be a non-empty string"),
    ({"items": [{"id": "a", "attributes": ["v" * (const.MAX_ATTRIBUTE_CHARS + 1)]}]}, "at most 256 characters"),
    ({"items": [{"id": "a", "attributes": [str(i) for i in range(const.MAX_ITEM_ATTRIBUTES + 1)]}]},
     f"at most {const.MAX_ITEM_ATTRIBUTES}"),
    ({"items": [{"id": "a"}, {"id": "b"}, {"id": "a", "attributes": ["17"]}]}, "'items[2].id' 'a' repeats items[0]"),
])
def test_bad_batches_are_refused_whole(model, params, words):
    service = Service(None)

    async def go():
        await boot(service, model)
        with pytest.raises(InvalidParams) as err:
            await service.add_items(params)
        assert words in str(err.value)
        assert service.model is model and service.added == {} and "a" not in service.model.index

    run(service, go())


def test_known_ids_repeats_and_updates(model):
    service = Service(None)
    trained = model.item_ids[7]

    async def go():
        await boot(service, model)
        before = service.model
        res = await service.add_items({"items": [{"id": trained, "attributes": ["zzz"]}, {"id": 987654321}]})
        assert res["known"] == [trained] and res["added"] == 1 and res["composed_from"] == {"987654321": 0}
        assert service.model.index[trained] == before.index[trained]   # the trained row stays
        assert "zzz" not in service.model.attr_rows                    # and its attributes are the bundle's
        await service.add_items({"items": [{"id": "n", "attributes": ["2", "17", "old-line"]}]})
        row, m1 = service.model.index["n"], service.model
        same = await service.add_items({"items": [{"id": "n", "attributes": ["17", "old-line", "2", "17"]}]})
        assert same == {"ok": True, "added": 0, "updated": 0, "known": ["n"], "composed_from": {}}
        assert service.model is m1                                     # nothing rebuilt, the cache kept
        upd = await service.add_items({"items": [{"id": "n", "attributes": ["4", "new-line"]}]})
        assert upd == {"ok": True, "added": 0, "updated": 1, "known": [], "composed_from": {"n": 1}}
        m2 = service.model
        assert m2.index["n"] == row and m2.num_added == 2 and service.health({})["added_items"] == 2
        v, _ = model.compose([("4", "new-line")])
        q, s = quantize_rows(v)
        assert np.array_equal(m2.items[row], q[0]) and m2.scales[row] == s[0]
        assert "old-line" not in m2.attr_rows and m2.attr_rows["new-line"].tolist() == [row]
        assert row not in m2.attr_rows["17"] and row in m1.attr_rows["17"]   # m1 is untouched
        assert service.added["n"] == ("4", "new-line")

    run(service, go())


def test_added_items_bound_refuses_the_whole_batch(model, monkeypatch):
    monkeypatch.setattr(const, "MAX_ADDED_ITEMS", 3)
    service = Service(None)

    async def go():
        await boot(service, model)
        await service.add_items({"items": [{"id": "a"}, {"id": "b"}]})
        with pytest.raises(InvalidParams, match="2 items are added already and 2 more would pass 3"):
            await service.add_items({"items": [{"id": "c"}, {"id": "d"}]})
        assert sorted(service.added) == ["a", "b"] and service.model.num_added == 2
        await service.add_items({"items": [{"id": "a", "attributes": ["17"]}, {"id": "c"}]})   # an update is free
        assert service.model.num_added == 3

    run(service, go())


def test_no_model_and_concurrent_scans(model):
    service = Service(None)

    async def go():
        from edge_runtime.errors import ModelNotLoadedError
        with pytest.raises(ModelNotLoadedError):
            await service.add_items({"items": [{"id": "a"}]})
        await boot(service, model)
        # recommends on the scoring threads while batches are added: every reply is whole and from one model state
        hist = [[model.item_ids[i]] for i in range(40)]
        reqs = [service.recommend({"history": h, "k": 50, "filters": {"category": ["17", "c-new"]}}) for h in hist]
        adds = [service.add_items({"items": [{"id": f"c{b}-{j}", "attributes": ["17", "c-new"]} for j in range(50)]})
                for b in range(8)]
        out = await asyncio.gather(*reqs, *adds)
        for res in out[:40]:
            assert len(res["items"]) == 50 and np.all(np.isfinite(res["scores"]))
            assert res["scores"] == sorted(res["scores"], reverse=True)
        assert service.model.num_added == 400
        res = await service.recommend({"history": hist[0], "k": 1000, "filters": {"category": "c-new"}})
        assert len(res["items"]) == 400

    run(service, go())


# ------------------------------------------------------------------------------------------------------ swap, restart
def test_added_items_survive_a_swap(model, older, tiny_bundle):
    """Added on the older model (which lacks the bundle's last item): after the swap to the model trained on that
    item it uses the trained row and leaves the added set; the others are composed again from the new bundle."""
    service = Service(None)
    late = model.item_ids[-1]
    late_attrs = item_attrs(model, tiny_bundle, model.num_items - 1)
    assert late not in older.index

    async def go():
        swapper = await boot(service, older)
        res = await service.add_items({"items": [{"id": late, "attributes": list(late_attrs)},
                                                 {"id": "brand-new", "attributes": ["17", "fresh-line"]}]})
        assert res["added"] == 2 and service.model.num_added == 2
        assert service.model.index[late] == older.num_items               # composed, appended after the trained rows
        async with swapper.lock():
            await swapper.activate(model, "sync")
        m = service.model
        assert m.version == model.version and m.num_added == 1 and service.added == {"brand-new": ("17", "fresh-line")}
        assert m.index[late] == model.num_items - 1                        # the trained row now
        assert np.array_equal(m.items[:model.num_items], model.items)
        v, _ = model.compose([("17", "fresh-line")])
        q, s = quantize_rows(v)
        assert np.array_equal(m.items[m.index["brand-new"]], q[0])
        res = await service.recommend({"history": [model.item_ids[0]], "filters": {"category": "fresh-line"}})
        assert res["items"] == ["brand-new"] and res["model_version"] == model.version
        assert service.health({})["added_items"] == 1 and service.model_info({})["added_items"] == 1
        # back to the older model (a rollback): the remaining added item is composed onto it again
        async with swapper.lock():
            await swapper.activate(older, "rollback")
        assert service.model.num_added == 1 and late not in service.model.index

    run(service, go())


def test_a_failed_swap_keeps_the_added_items(model, older):
    service = Service(None)

    async def go():
        swapper = await boot(service, model)
        await service.add_items({"items": [{"id": "keep", "attributes": ["17"]}]})
        served = service.model
        bad = Model(older.path, verify=False)
        bad.encode = lambda rows: older.encode(rows) * float("nan")
        async with swapper.lock():
            with pytest.raises(SwapError):
                await swapper.activate(bad, "sync")
        assert service.model is served and service.added == {"keep": ("17",)}

    run(service, go())


def test_added_items_survive_a_restart_with_a_state_file(model, tmp_path):
    path = tmp_path / "state" / const.ADDED_ITEMS_FILE   # the state directory is created by the first write
    first = Service(None, added_items=path)

    async def go_first():
        await boot(first, model)
        await first.add_items({"items": [{"id": "kept", "attributes": ["17", "2"]}, {"id": "bare"}]})
        return first.model.items[first.model.index["kept"]].copy()

    row = run(first, go_first())
    doc = json.loads(path.read_text())
    assert doc == {"format": 1, "items": [{"id": "kept", "attributes": ["17", "2"]}, {"id": "bare", "attributes": []}]}
    assert not path.with_name(path.name + ".tmp").exists()
    second = Service(None, added_items=path)   # the daemon restarted: the file is read, the boot swap composes
    assert second.added == {"kept": ("17", "2"), "bare": ()}

    async def go_second():
        await boot(second, model)
        assert second.model.num_added == 2 and np.array_equal(second.model.items[second.model.index["kept"]], row)
        res = await second.recommend({"history": [model.item_ids[1]], "k": 3, "filters": {"category": "2"}})
        assert res["items"]

    run(second, go_second())


def test_damaged_state_file_is_set_aside_and_unwritable_one_refuses(model, tmp_path):
    path = tmp_path / const.ADDED_ITEMS_FILE
    path.write_text('{"format": 1, "items": [{"id": ""}]}')
    service = Service(None, added_items=path)
    assert service.added == {} and not path.exists() and path.with_name(path.name + ".bad").exists()
    (tmp_path / "not-a-dir").write_text("")
    broken = Service(None, added_items=tmp_path / "not-a-dir" / const.ADDED_ITEMS_FILE)

    async def go():
        await boot(broken, model)
        with pytest.raises(EdgeRuntimeError, match="cannot store the added items.*nothing was added"):
            await broken.add_items({"items": [{"id": "x"}]})
        assert broken.model is model and broken.added == {}

    run(broken, go())
    service.executor.shutdown()


# ------------------------------------------------------------------------------------------------------ socket
def test_add_items_over_the_daemon_socket(daemon, tiny_bundle):
    _, port = daemon
    first = Model(tiny_bundle).item_ids[0]
    with Client("127.0.0.1", port, timeout=10) as c:
        assert c.call("health")["added_items"] == 0
        res = c.call("add_items", items=[{"id": "sock-1", "attributes": ["17", "socket-line"]}, {"id": first}])
        assert res == {"ok": True, "added": 1, "updated": 0, "known": [first], "composed_from": {"sock-1": 1}}
        rec = c.call("recommend", history=[first], k=5, filters={"category": "socket-line"})
        assert rec["items"] == ["sock-1"] and np.isfinite(rec["scores"][0])
        assert c.call("health")["added_items"] == 1 and c.call("model_info")["added_items"] == 1
        with pytest.raises(RpcError) as err:
            c.call("add_items", items=[{"id": "sock-2"}, {"id": "sock-3", "attributes": [7]}])
        assert err.value.name == "InvalidParams" and "items[1].attributes[0]" in err.value.message
        assert c.call("health")["added_items"] == 1
        c.call("set_availability", items=["sock-1"], in_stock=False)
        assert c.call("recommend", history=[first], k=5, filters={"category": "socket-line"})["items"] == []
