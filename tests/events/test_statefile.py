"""``events/statefile.write_atomic`` under concurrent writers (the shipper writes ``upstream.json`` from the event
loop on ``forget`` and from worker threads on acknowledgements; the fuzzer found them racing on one temporary
file: ``FileNotFoundError`` from ``os.replace``, an ``InternalError`` reply to ``forget``)."""
from __future__ import annotations

import json
import stat
import threading

from edge_runtime.events.statefile import write_atomic


def test_concurrent_writers_of_one_file_never_fail_or_tear(tmp_path):
    path = tmp_path / "upstream.json"
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(w: int) -> None:
        barrier.wait()
        for i in range(150):
            try:
                write_atomic(path, json.dumps({"writer": w, "i": i, "pad": "x" * (w * 997 % 4096)}), mode=0o600)
            except BaseException as exc:   # noqa: BLE001 - the test records any failure
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    last = json.loads(path.read_text())   # whole, one writer's last or some writer's complete state
    assert last["i"] == 149 and len(last["pad"]) == last["writer"] * 997 % 4096
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.json"]   # no temporary file left behind
