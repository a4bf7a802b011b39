"""covpool.outputs: the one atomic write behind every file the commands write, tables, figures, console lines."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest
import torch

from covpool import bench, outputs
from covpool.train import checkpoint as ckpt_mod
from covpool.train.summary import format_history, plot_curves, write_metrics


def test_atomic_save_leaves_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_mod.atomic_save({"w": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.atomic_save({"w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_full_disk_names_the_file_and_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_mod.atomic_save({"w": torch.ones(3)}, path)

    def full_disk(obj, f):  # what torch.save does on ENOSPC: the OSError, then a RuntimeError on cleanup
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            # as torch.save does: the real cause only as the implicit context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write {path}: No space left on device; the previous file is "
                                      "untouched") as err:
        ckpt_mod.atomic_save({"w": torch.zeros(3)}, path)
    assert err.value.errno == errno.ENOSPC and os.listdir(tmp_path) == ["last.pt"]


def _history_rows():
    return [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.5, "train_acc": 50.0, "val_acc1": 40.0, "lr": 0.1}]


def _bench_rows():
    return [{"variant": v, "d": 8, "batch": 2, "device": "cpu", "root": "sqrt", "fwd+bwd ms": 1.0 + i,
             "fwd+bwd prod-eq": 3.0 + i, "fwd err well-conditioned": 1e-3, "fwd err ill-conditioned": 1e-2}
            for i, v in enumerate(("ns", "eig"))]


@pytest.mark.parametrize("writer", ["checkpoint", "metrics.csv", "curves.png", "bench.csv", "bench.png"])
def test_every_output_is_written_one_atomic_way(tmp_path, monkeypatch, writer):
    """The four writers (checkpoints, metrics.csv, plots, the benchmark's files) share one atomic write: a
    full disk at the fsync leaves the old file whole, no temporary file, and one message naming the file."""
    write = {"checkpoint": lambda p: ckpt_mod.atomic_save({"w": torch.ones(3)}, p),
             "metrics.csv": lambda p: write_metrics(_history_rows(), p),
             "curves.png": lambda p: plot_curves({"": _history_rows()}, p),
             "bench.csv": lambda p: outputs.write_csv(_bench_rows(), p),
             "bench.png": lambda p: bench.plot(_bench_rows(), p)}[writer]
    path = tmp_path / "sub" / writer  # the folder is created
    write(path)
    before = path.read_bytes()
    assert len(before) > 20 and os.listdir(path.parent) == [writer]

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"could not write {path}: No space left on device; the previous file is "
                                      "untouched") as err:
        write(path)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(path.parent) == [writer] and path.read_bytes() == before


@pytest.fixture
def umask():
    """Sets the process's umask for one test (and restores it)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("writer", ["checkpoint", "metrics.csv", "curves.png", "bench.csv", "bench.png"])
def test_outputs_get_the_umasks_mode_like_any_new_file(tmp_path, umask, writer):
    """best.pt, last.pt, metrics.csv and the plots were written 0600 (mkstemp's mode) while config.yaml got
    the umask's 0644: colleagues on a shared file system could read a run's config but not its checkpoint. A
    new file now gets 0666 less the umask; a replaced file keeps the mode its owner gave it."""
    write = {"checkpoint": lambda p: ckpt_mod.atomic_save({"w": torch.ones(3)}, p),
             "metrics.csv": lambda p: write_metrics(_history_rows(), p),
             "curves.png": lambda p: plot_curves({"": _history_rows()}, p),
             "bench.csv": lambda p: outputs.write_csv(_bench_rows(), p),
             "bench.png": lambda p: bench.plot(_bench_rows(), p)}[writer]
    for mask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
        umask(mask)
        path = tmp_path / f"{mask:o}" / writer
        write(path)
        config = path.parent / "config.yaml"
        config.write_text("name: x\n")  # as the run folder writes its config
        assert oct(path.stat().st_mode & 0o777) == oct(mode) == oct(config.stat().st_mode & 0o777)
    os.chmod(path, 0o600)  # its owner's choice survives the next write
    write(path)
    assert path.stat().st_mode & 0o777 == 0o600 and sorted(os.listdir(path.parent)) == sorted([writer, "config.yaml"])


def _drawn(monkeypatch, runs, **kwargs):
    """The figure plot_curves draws for ``runs`` (drawn, not saved)."""
    from covpool.train import summary

    figures = []
    monkeypatch.setattr(summary, "save_figure", lambda fig, path, dpi=90: figures.append(fig) or path)
    summary.plot_curves(runs, "unused.png", **kwargs)
    (fig,) = figures
    fig.canvas.draw()
    return fig


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_curves_have_whole_epoch_ticks_and_the_ema_accuracy(monkeypatch, epochs):
    """A 1-epoch plot had ticks at 0.96, 0.98, ...; a run with an EMA did not show its EMA accuracy."""
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 40.0 + e, "val_acc1": 35.0 + e,
             "ema_val_acc1": 36.0 + e} for e in range(1, epochs + 1)]
    fig = _drawn(monkeypatch, {"": rows}, title="run: resnet18, head isqrt_cov, backend ns")
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == list(range(1, epochs + 1)), ticks
    acc = fig.axes[1]
    labels = [t.get_text() for t in acc.get_legend().get_texts()]
    assert labels == ["train", "val", "EMA val"]
    (ema,) = [line for line in acc.get_lines() if line.get_label() == "EMA val"]
    assert list(ema.get_ydata()) == [r["ema_val_acc1"] for r in rows]
    assert fig._suptitle.get_text() == "run: resnet18, head isqrt_cov, backend ns"
    no_ema = _drawn(monkeypatch, {"": [dict(r, ema_val_acc1=float("nan")) for r in rows]})
    assert [t.get_text() for t in no_ema.axes[1].get_legend().get_texts()] == ["train", "val"]


def test_machine_stamp_and_markdown_page(tmp_path):
    stamp = bench.machine_stamp(["covpool", "bench", "--out", "a b"])
    assert stamp.startswith("Measured 20") and f"torch {torch.__version__}" in stamp
    assert f"({os.cpu_count()} logical CPUs), {torch.get_num_threads()} torch threads," in stamp
    assert ("GPU: none" in stamp) != torch.cuda.is_available() and stamp.endswith("by `covpool bench --out 'a b'`.")
    page = outputs.write_markdown_page(tmp_path / "docs" / "page.md", "Title", stamp, ["| a |\n|---|\n| 1 |"],
                                       [tmp_path / "docs" / "plot.png", tmp_path / "other" / "p.png"])
    assert page.read_text() == (f"# Title\n\n{stamp}\n\n| a |\n|---|\n| 1 |\n\n![plot.png](plot.png)\n\n"
                                "![p.png](../other/p.png)\n")


def test_one_table_writer_two_styles():
    """covpool bench's Markdown table and a run's aligned table come from the same function, the only one."""
    rows = [{"variant": "ns", "d": 64, "ms": 1.23456, "err": float("nan")}, {"variant": "eig", "d": 64, "ms": 12345.0}]
    assert outputs.format_table(rows, ["variant", "ms", "err"], markdown=True).splitlines() == [
        "| variant | ms | err |", "|---|---|---|", "| ns | 1.23 | nan |", "| eig | 1.23e+04 | – |"]
    assert outputs.format_table(rows, ["variant", "ms"], headers={"ms": "time"}, formats={"ms": "{:.1f}"}
                                ).splitlines() == ["variant     time", "-------  -------", "     ns      1.2",
                                                   "    eig  12345.0"]
    assert "format_table" not in bench.__all__  # its old Markdown wrapper is deprecated (tests/test_api.py)
    history = [{"epoch": 1, "train_loss": 2.0, "train_acc": 25.0, "val_loss": 1.5, "val_acc1": 50.0, "val_acc5": 75.0,
                "ema_val_acc1": float("nan"), "epoch_time_s": 0.5, "train_img_per_s": 100.0}]
    table = format_history(history).splitlines()
    assert table[0].split() == ["epoch", "train", "loss", "train", "acc%", "val", "loss", "val", "acc%", "val",
                                "top5%", "time", "s", "img/s"]  # no EMA column for a run without one
    assert table[2].split() == ["1", "2.0000", "25.00", "1.5000", "50.00", "75.00", "0.5", "100"]
    assert "EMA val%" in format_history([dict(history[0], ema_val_acc1=48.0)])


def test_figures_leave_matplotlib_global_state_alone(tmp_path):
    """bench.png and curves.png are drawn on an Agg canvas without pyplot: the backend a program chose stays,
    and no figure stays open in pyplot's registry."""
    import matplotlib

    backend = matplotlib.get_backend()
    bench.plot(_bench_rows(), tmp_path / "bench.png")
    plot_curves({"a": _history_rows(), "b": _history_rows()}, tmp_path / "curves.png")
    assert matplotlib.get_backend() == backend
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "curves.png").stat().st_size > 1000
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_importing_outputs_or_bench_does_not_load_the_training_package():
    code = ("import sys, covpool.outputs, covpool.bench; "
            "print(sorted(m for m in sys.modules if m.startswith('covpool.train') or m == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(outputs.Path(outputs.__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_log_lines_go_to_the_console_unless_the_program_routes_or_silences_them(capsys):
    log = logging.getLogger("covpool.train.engine")
    with outputs.console_logging():
        log.info("epoch 1/1  shown")
    assert capsys.readouterr().out == "epoch 1/1  shown\n"
    logging.getLogger("covpool").setLevel(logging.WARNING)  # silenced
    try:
        with outputs.console_logging():
            log.info("epoch 1/1  silenced")
    finally:
        logging.getLogger("covpool").setLevel(logging.NOTSET)
    assert capsys.readouterr().out == ""
    routed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: routed.append(record.getMessage())
    logging.getLogger("covpool").addHandler(handler)  # routed: the program's handler, not the console
    logging.getLogger("covpool").setLevel(logging.INFO)
    try:
        with outputs.console_logging():
            log.info("epoch 1/1  routed")
    finally:
        logging.getLogger("covpool").removeHandler(handler)
        logging.getLogger("covpool").setLevel(logging.NOTSET)
    assert routed == ["epoch 1/1  routed"] and capsys.readouterr().out == ""
    assert not logging.getLogger("covpool").handlers and logging.getLogger("covpool").level == logging.NOTSET



def test_what_a_killed_write_leaves_is_what_the_clean_up_removes(tmp_path):
    """The temporary name is spelled once, beside atomic_write: the clean-up finds exactly what a write killed
    mid-way (SIGKILL: no handler runs) left, whatever the random part, and nothing of anyone else's."""
    path = tmp_path / "last.pt"
    outputs.atomic_write(path, lambda f: f.write(b"the previous checkpoint"))
    pid = os.fork()
    if pid == 0:  # the writer, killed in the middle of its write
        outputs.atomic_write(path, lambda f: (f.write(b"half"), f.flush(), os._exit(0)))
    os.waitpid(pid, 0)
    others = [".notes.tmp", "last.pt.tmp", ".other.pt.x.tmp", ".last.ptx.ab.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".last.pt."))
    assert len(left) == 1 and left[0].endswith(".tmp")  # `.last.pt.<random>.tmp`
    assert [p.name for p in outputs.remove_leftover_temporaries(path)] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", *others])
    assert path.read_bytes() == b"the previous checkpoint"
