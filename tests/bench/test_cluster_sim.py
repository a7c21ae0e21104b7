"""bench/cluster_sim.py on a reduced case: its outputs, their SIMULATION labels, its ratios."""
import json
import math

from bench import cluster_sim


def test_the_reduced_cluster_simulation_writes_labelled_outputs_with_sane_ratios(tmp_path, capsys):
    out = tmp_path / "cluster_sim"
    assert cluster_sim.main(["--blocks", "6", "--seeds", "1", "--sim-duration", "0.2", "--sim-steps", "3",
                             "--sim-min-requests", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("SIMULATION") and "links NOT modelled" in printed
    md, data = out.with_suffix(".md").read_text(), json.loads(out.with_suffix(".json").read_text())
    assert md.startswith("# SIMULATION") and "does not model cross-host links" in md
    assert data["label"] == "SIMULATION" and data["command"].startswith("python3 -m bench.cluster_sim")
    assert {"date", "python", "numpy", "torch", "lscpu"} <= set(data["machine"])
    assert "ASSUMPTION" in data["links"]["datacenter"]["source"]

    for table in data["ratios"].values():
        assert table
        for key, v in table.items():
            assert v is not None and math.isfinite(v) and v > 0, (key, v)

    cases = {(c["cluster"], c["link"]): c for c in data["cases"]}
    assert {c for c, _ in cases} == {"A", "B1", "B2"}
    for (cluster, link), c in cases.items():
        assert c["dp"] is not None and c["dp"]["goodput"] > 0
        for sim in c["sim"].values():
            assert sim["label"] == "SIMULATION" and sim["links_modelled"] == (not sim["remote_hosts_used"])
        if link not in ("loopback", "datacenter"):
            continue
        assert any(d["host"] != "local" for d in c["devices"]) and "link_load" in c
        for base in ("host pools, no links", "one host"):        # links only cost
            ref = cases.get((cluster, base))
            if ref is None:
                continue
            for kind in ("dp", "stock", "ee_batch"):
                if c[kind] is not None:
                    assert ref[kind] is not None
                    assert c[kind]["goodput"] <= ref[kind]["goodput"] * (1 + 1e-9), (cluster, link, base, kind)
