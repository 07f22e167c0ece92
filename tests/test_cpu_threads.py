"""The trainers' default CPU thread count: the cores other processes leave free (issue 22 item 3)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vqvae_fast.train import cifar10, loop, prior_trainer


@pytest.fixture(autouse=True)
def four_cores(monkeypatch):
    """A 4-core machine whose torch default is 4 threads; torch's thread count restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(loop, "_TORCH_THREADS", 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(threads)


def proc_stat(monkeypatch, busy_jiffies: dict[int, int], own_cpu_s: float = 0.0, interval_jiffies: int = 20):
    """/proc/stat read twice, `interval_jiffies` apart (0.2 s), with `busy_jiffies` busy on each CPU
    between the reads, of which this process spent `own_cpu_s`."""
    reads = iter([{c: (1000, 5000) for c in range(8)},
                  {c: (1000 + busy_jiffies.get(c, 0), 5000 + interval_jiffies) for c in range(8)}])
    clock, own = iter([0.0, 0.2]), iter([1.0, 1.0 + own_cpu_s])
    monkeypatch.setattr(loop, "_read_cpu_times", lambda: next(reads))
    monkeypatch.setattr(loop, "time", SimpleNamespace(sleep=lambda s: None, perf_counter=lambda: next(clock),
                                                      process_time=lambda: next(own)))


def test_idle_cores_all_become_threads(monkeypatch, capsys):
    proc_stat(monkeypatch, {})
    assert loop.set_cpu_threads(0) == 4 == torch.get_num_threads()
    assert capsys.readouterr().out == ""  # nothing to say when every core is used


def test_busy_cores_are_left_to_their_processes_and_the_choice_is_said(monkeypatch, capsys):
    proc_stat(monkeypatch, {0: 20, 1: 12, 5: 20})  # cpu 5 is not ours: its load does not count
    assert loop.busy_cores({0, 1, 2, 3}) == pytest.approx(1.6)
    proc_stat(monkeypatch, {0: 20, 1: 12, 5: 20})
    assert loop.set_cpu_threads(0) == 2 == torch.get_num_threads()
    out = capsys.readouterr().out
    assert "CPU threads: 2 of 4" in out and "1.6 of the 4 cores busy" in out and "--workers" in out


def test_a_core_counts_as_taken_from_half_busy(monkeypatch):
    proc_stat(monkeypatch, {0: 9})  # 0.45 of a core
    assert loop.set_cpu_threads(0) == 4
    proc_stat(monkeypatch, {0: 10})
    assert loop.set_cpu_threads(0) == 3


def test_this_process_s_own_time_is_not_counted_as_others(monkeypatch):
    proc_stat(monkeypatch, {0: 20, 1: 20}, own_cpu_s=0.4)  # both busy cores were this process
    assert loop.busy_cores({0, 1, 2, 3}) == pytest.approx(0.0)


def test_never_fewer_than_one_thread(monkeypatch):
    proc_stat(monkeypatch, {c: 20 for c in range(4)})
    assert loop.set_cpu_threads(0) == 1
    proc_stat(monkeypatch, {})
    monkeypatch.setattr(loop, "_read_cpu_times", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(loop.os, "getloadavg", lambda: (37.0, 20.0, 10.0))
    assert loop.set_cpu_threads(0) == 1


def test_without_proc_stat_the_load_average_is_spread_over_the_machine(monkeypatch):
    proc_stat(monkeypatch, {})
    monkeypatch.setattr(loop, "_read_cpu_times", lambda: None)
    monkeypatch.setattr(loop.os, "cpu_count", lambda: 8)  # 4 of the machine's 8 CPUs are ours
    monkeypatch.setattr(loop.os, "getloadavg", lambda: (4.0, 1.0, 1.0))
    assert loop.busy_cores({0, 1, 2, 3}) == pytest.approx(2.0)
    assert loop.set_cpu_threads(0) == 2
    monkeypatch.setattr(loop.os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert loop.set_cpu_threads(0) == 4


def test_never_more_than_torch_s_default(monkeypatch):
    proc_stat(monkeypatch, {})
    monkeypatch.setattr(loop, "_TORCH_THREADS", 2)  # e.g. 2 physical cores, 4 hardware threads
    assert loop.set_cpu_threads(0) == 2


def test_an_explicit_count_wins_without_measuring(monkeypatch, capsys):
    monkeypatch.setattr(loop, "busy_cores", lambda cpus: pytest.fail("measured despite an explicit count"))
    assert loop.set_cpu_threads(3) == 3 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes
    assert loop.set_cpu_threads(0) == 1
    assert loop.set_cpu_threads(2) == 2  # --workers before the environment
    assert capsys.readouterr().out == ""


class Stop(Exception):
    pass


@pytest.mark.parametrize("command", [cifar10, prior_trainer])
@pytest.mark.parametrize("flags, workers", [([], 0), (["--workers", "3"], 3)])
def test_the_trainers_set_their_threads_with_it(command, flags, workers, monkeypatch, tmp_path):
    calls = []

    def spy(requested):
        calls.append(requested)
        raise Stop  # the threads are set before anything else happens: no need to train

    monkeypatch.setattr(command, "set_cpu_threads", spy)
    with pytest.raises(Stop):
        command.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path), *flags])
    assert calls == [workers]
