"""Serving many adapters: per-layer slot maps (rows only where an adapter adapts, reused after deletes, memory
returned), per-call arguments under concurrent callers and concurrent adds / deletes, context-local
``disable_adapters``. Oracle: PEFT's ``_apply_road`` applied eagerly, one sample at a time."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import MLP, eager_road_forward, mlp_input, road_params_of

import fx_adapters as fxa

CONFIGS = [fxa.RoadConfig(group_size=4, target_modules=["lin0"], init_weights=False),
           fxa.RoadConfig(variant="road_2", group_size=2, target_modules=["lin0", "lin1"], init_weights=False),
           fxa.RoadConfig(variant="road_4", group_size=2, target_modules=["lin1"], init_weights=False)]


def expected(am, model, x, assignment):
    adapters = {name: (am.adapters[name], road_params_of(am, name)) for name in set(assignment) - {"__base__"}}
    with torch.no_grad():
        return eager_road_forward(model, lambda m, i: m(x[i:i + 1]), adapters, assignment)


def adapted(n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP().eval()
    am = fxa.compile_with_road(model, CONFIGS[0], adapter_name="a0").eval()
    for i in range(1, n):
        am.add_adapter(f"a{i}", CONFIGS[i % len(CONFIGS)])
    return model, am


def table_bytes(am) -> int:
    return sum(b.numel() * b.element_size() for b in am.graph_module.road_adapters.buffers())


def param_bytes(am) -> int:
    return sum(p.numel() * p.element_size() for p in am.graph_module.road_adapters.parameters())


def test_a_mixed_batch_among_many_adapters_with_deletes_and_reused_rows_equals_each_adapter_alone():
    model, am = adapted(30)
    for i in range(0, 30, 3):
        am.delete_adapter(f"a{i}")
    for i in range(30, 40):  # take the ids and rows of the deleted ones
        am.add_adapter(f"a{i}", CONFIGS[i % len(CONFIGS)])
    x = mlp_input()
    assignment = ["a1", "__base__", "a35", "a2", "a39", "a31", "a4", "a29", "a30"]
    with torch.inference_mode():
        out = am(x, adapter_names=assignment)
    torch.testing.assert_close(out, expected(am, model, x, assignment), atol=1e-5, rtol=0)


def test_adapter_name_runs_one_adapter_or_the_base_model_for_the_whole_batch():
    model, am = adapted(3)
    x = mlp_input()
    with torch.inference_mode():
        torch.testing.assert_close(am(x, adapter_name="a2"), expected(am, model, x, ["a2"] * 9), atol=1e-5, rtol=0)
        torch.testing.assert_close(am(x, adapter_name="__base__"), model(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        am(x, adapter_name="nope")
    with pytest.raises(ValueError, match="not both"):
        am(x, adapter_name="a1", adapter_names=["a1"] * 9)


def test_tables_hold_rows_only_for_the_adapters_that_adapt_the_layer():
    model, am = adapted(1)
    for i in range(1, 41):  # 40 adapters of one layer each: lin1's tables must not grow
        am.add_adapter(f"b{i}", fxa.RoadConfig(group_size=4, target_modules=["lin0"], init_weights=False))
    lin1 = fxa.RoadConfig(group_size=2, target_modules=["lin1"], init_weights=False)
    am.add_adapter("one", lin1)
    assert am.graph_module.road_adapters["lin1"].table_g2.shape[0] <= 4
    assert table_bytes(am) <= 4 * param_bytes(am)


def test_memory_returns_when_adapters_are_deleted_and_the_rest_still_compute_right():
    model, am = adapted(1)
    for i in range(1, 200):
        am.add_adapter(f"b{i}", CONFIGS[0])
    full = table_bytes(am)
    for i in range(1, 195):
        am.delete_adapter(f"b{i}")
    assert table_bytes(am) * 4 < full
    x = mlp_input()
    assignment = ["b195", "a0", "b199", "__base__", "b196", "b197", "b198", "a0", "b195"]
    with torch.inference_mode():
        torch.testing.assert_close(am(x, adapter_names=assignment), expected(am, model, x, assignment),
                                   atol=1e-5, rtol=0)


def test_loading_new_values_into_one_adapter_changes_only_its_outputs(tmp_path):
    model, am = adapted(4)
    x = mlp_input()
    assignment = ["a1", "a2", "a3", "a0", "a1", "a2", "a3", "a0", "__base__"]
    with torch.inference_mode():
        before = am(x, adapter_names=assignment)
    other = fxa.compile_with_road(MLP().eval(), am.adapters["a3"], adapter_name="a3")
    other.save_adapter(tmp_path / "a3")
    am.load_adapter(tmp_path / "a3", adapter_name="a3", config=am.adapters["a3"])
    with torch.inference_mode():
        after = am(x, adapter_names=assignment)
    torch.testing.assert_close(after, expected(am, model, x, assignment), atol=1e-5, rtol=0)
    changed = (after - before).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == [name == "a3" for name in assignment]


def test_four_threads_disabling_adapters_at_once_leave_the_module_enabled():
    model, am = adapted(2)
    x = mlp_input()
    with torch.inference_mode():
        adapted_out, base_out = am(x), model(x)
    barrier, wrong = threading.Barrier(4), []

    def worker():
        barrier.wait()
        for _ in range(20):
            with am.disable_adapters(), torch.inference_mode():
                if not torch.allclose(am(x), base_out, atol=1e-6):
                    wrong.append("disabled")
            with torch.inference_mode():
                if not torch.allclose(am(x), adapted_out, atol=1e-6):
                    wrong.append("enabled")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    with torch.inference_mode():
        torch.testing.assert_close(am(x), adapted_out, atol=0, rtol=0)


def test_disable_adapters_holds_in_its_own_asyncio_task_only():
    model, am = adapted(1)
    x = mlp_input()
    with torch.inference_mode():
        adapted_out, base_out = am(x), model(x)

    async def disabled():
        with am.disable_adapters():
            await asyncio.sleep(0.01)
            with torch.inference_mode():
                return am(x)

    async def enabled():
        await asyncio.sleep(0.005)
        with torch.inference_mode():
            return am(x)

    async def both():
        return await asyncio.gather(disabled(), enabled())

    off, on = asyncio.run(both())
    torch.testing.assert_close(off, base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(on, adapted_out, atol=0, rtol=0)


def test_per_call_adapter_names_stay_right_while_other_threads_add_and_delete_adapters():
    model, am = adapted(4)
    x = mlp_input()
    assignment = ["a1", "a2", "a3", "a0", "__base__", "a3", "a2", "a1", "a0"]
    want = expected(am, model, x, assignment)
    stop, wrong, errors = threading.Event(), [], []

    def caller():
        while not stop.is_set():
            with torch.inference_mode():
                if not torch.allclose(am(x, adapter_names=assignment), want, atol=1e-5):
                    wrong.append(1)

    def churn():
        try:
            for i in range(30):
                am.add_adapter(f"t{i}", CONFIGS[i % len(CONFIGS)])
                if i % 2:
                    am.delete_adapter(f"t{i - 1}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=caller) for _ in range(3)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong


def test_deleting_an_adapter_another_thread_calls_never_gives_it_another_adapters_row():
    model, am = adapted(2)
    x = mlp_input()
    victim = ["a1"] * 9
    want = expected(am, model, x, victim)
    results, started = [], threading.Event()

    def caller():
        for _ in range(200):
            try:
                with torch.inference_mode():
                    results.append(torch.allclose(am(x, adapter_names=victim), want, atol=1e-5))
            except ValueError as e:
                results.append("unknown adapter(s) ['a1']" in str(e))
            started.set()

    thread = threading.Thread(target=caller)
    thread.start()
    started.wait()
    am.delete_adapter("a1")
    for i in range(5):  # new adapters reuse a1's id and rows
        am.add_adapter(f"new{i}", fxa.RoadConfig(group_size=4, target_modules=["lin0"], init_weights=False))
    thread.join()
    assert results and all(results)


@pytest.mark.parametrize("switch", ["set_adapter", "merge", "unmerge"])
def test_module_wide_switches_refuse_while_other_threads_are_in_calls_and_change_nothing(switch):
    model, am = adapted(2)
    x = mlp_input()
    if switch == "unmerge":
        am.merge()
    with torch.no_grad():
        before = am(x)
    inside, leave = threading.Event(), threading.Event()

    def call_in_flight():  # what every call holds while it runs
        with am.serving.shared():
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=call_in_flight)
    thread.start()
    inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match=rf"{switch}: 1 call\(s\) of this module are running in other threads.*"
                                               "adapter_name= / adapter_names= per call"):
            getattr(am, switch)(*(["a1"] if switch == "set_adapter" else []))
    finally:
        leave.set()
        thread.join()
    with torch.no_grad():
        assert torch.equal(am(x), before)
    assert am.active_adapters == ["a0"] and am.merged == (switch == "unmerge")
    getattr(am, switch)(*(["a1"] if switch == "set_adapter" else []))  # between calls it runs
    assert am.active_adapters == (["a1"] if switch == "set_adapter" else ["a0"])


def test_a_deepcopy_gets_its_own_lock_and_tables():
    import copy

    model, am = adapted(3)
    x = mlp_input()
    with torch.inference_mode():
        want = am(x, adapter_names=["a1", "a2"] * 4 + ["a0"])
    clone = copy.deepcopy(am)
    with torch.inference_mode():
        torch.testing.assert_close(clone(x, adapter_names=["a1", "a2"] * 4 + ["a0"]), want, atol=0, rtol=0)
    clone.delete_adapter("a1")
    clone.add_adapter("more", CONFIGS[1])  # takes a1's id in the clone only
    with torch.inference_mode():
        torch.testing.assert_close(am(x, adapter_names=["a1", "a2"] * 4 + ["a0"]), want, atol=0, rtol=0)
    with clone.disable_adapters(), torch.inference_mode():
        torch.testing.assert_close(clone(x), model(x), atol=1e-6, rtol=0)


def test_load_state_dict_rewrites_the_rows_of_adapters_that_are_not_active():
    import copy

    model, am = adapted(3)
    other = copy.deepcopy(am)
    with torch.no_grad():
        for p in other.adapter_parameters("a2").values():
            p.add_(0.3)
    am.load_state_dict(other.state_dict())
    x = mlp_input()
    with torch.inference_mode():
        torch.testing.assert_close(am(x, adapter_name="a2"), expected(other, model, x, ["a2"] * 9), atol=1e-5, rtol=0)
