"""runtime/engine.py: what a worker does when an epoch is prepared."""
from e3.models.policies import make_policy
from e3.runtime import engine as engine_mod
from e3.runtime.engine import WorkerEngine
from e3.runtime.wire import Kind
from tests.support.mlp import MLPModel


def counting(monkeypatch):
    """Rows of every pass a split executor runs in this test."""
    passes = []
    real = engine_mod.SplitExecutor.__call__

    def call(self, state, **kw):
        passes.append((self.split.first, self.split.last, state.rows))
        return real(self, state, **kw)
    monkeypatch.setattr(engine_mod.SplitExecutor, "__call__", call)
    return passes


def prepare(engine, epoch, splits, batch):
    reply = engine.handle({"k": Kind.PREPARE, "epoch": epoch, "batch": batch, "rings": [], "splits": splits})
    assert reply["k"] == Kind.READY and reply["epoch"] == epoch


def test_a_cpu_worker_warms_a_split_once_at_one_row_and_never_again(monkeypatch):
    """A hot swap waits for the workers to prepare: on a CPU, rewarming every split at full batch
    cost MiniLM about 210 ms per swap at batch 16, during which the running epoch's batches waited."""
    passes = counting(monkeypatch)
    engine = WorkerEngine(MLPModel(), make_policy("patience", 2))
    prepare(engine, 1, [[0, 5]], 16)
    assert passes == [(0, 5, 1)]
    prepare(engine, 2, [[0, 1], [2, 5]], 8)
    assert passes[1:] == [(0, 1, 1), (2, 5, 1)]
    prepare(engine, 3, [[0, 5]], 32)                 # back to a split this worker ran: nothing to warm
    prepare(engine, 4, [[0, 1], [2, 5]], 16)
    assert len(passes) == 3


def test_a_new_policy_warms_its_new_executors_again(monkeypatch):
    passes = counting(monkeypatch)
    engine = WorkerEngine(MLPModel(), make_policy("patience", 2))
    prepare(engine, 1, [[0, 5]], 8)
    engine.handle({"k": Kind.POLICY, "name": "entropy", "threshold": 0.3})
    prepare(engine, 2, [[0, 5]], 8)
    assert passes == [(0, 5, 1), (0, 5, 1)]
