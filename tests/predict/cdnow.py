"""The CDNOW benchmark of predictive traits (issue 23), in two steps.

`send`: streams the CDNOW sample's calibration transactions (1997-01-01 to 1997-09-30)
through a running platform as `Order Completed` events over HTTP, defines three
predictive traits, asks for a fit, waits until every profile is evaluated with it and
writes the fitted parameters and each customer's values (stdlib only).

The dates are shifted by whole days so that 1997-09-30 is today (UTC): the platform
evaluates each customer as of the calibration period's end, as it would have on that
day. The hold-out period (1997-10-01 to 1998-06-30, 273 days) is never sent.

`score`: fits `lifetimes` on the same calibration data (days), predicts the same
hold-out, and prints the platform's figures beside the paper's and lifetimes'.

    python cdnow.py send CDNOW_sample.txt out.json
    python cdnow.py score CDNOW_sample.txt out.json
"""
import base64, datetime as dt, json, sys, time, urllib.error, urllib.request

INGEST, PROFILES = "http://127.0.0.1:8080", "http://127.0.0.1:8082"
WRITE_KEY, ADMIN = "demo-write-key", "demo-admin-token"
CAL_END, HOLD_END = dt.date(1997, 9, 30), dt.date(1998, 6, 30)
HORIZON = (HOLD_END - CAL_END).days  # 273
TRAITS = {
    "cdnow_alive": {"event": "Order Completed", "aggregate": "p_alive"},
    "cdnow_purchases_39w": {"event": "Order Completed", "aggregate": "predicted_purchases",
                            "horizon": f"{HORIZON}d"},
    "cdnow_value_39w": {"event": "Order Completed", "aggregate": "expected_value",
                        "property": "total", "horizon": f"{HORIZON}d"},
}
PAPER = {"r": 0.243, "alpha_weeks": 4.414, "a": 0.793, "b": 2.426}


def transactions(path):
    """(customer, date, dollars) of every line: `old-id sample-id yyyymmdd cds dollars`."""
    out = []
    for line in open(path):
        f = line.split()
        if len(f) == 5:
            out.append((int(f[1]), dt.datetime.strptime(f[2], "%Y%m%d").date(), float(f[4])))
    return out


def call(method, url, body=None, auth=None, ok=(200, 201, 202)):
    headers = {"Content-Type": "application/json", "Authorization": auth or f"Bearer {ADMIN}"}
    data = None if body is None else json.dumps(body).encode()
    for _ in range(200):
        req = urllib.request.Request(url, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code in ok or e.code == 404:
                return e.code, json.loads(e.read() or b"null")
            if e.code not in (429, 503):
                raise SystemExit(f"{method} {url}: {e.code} {e.read()[:300]}")
        time.sleep(0.25)
    raise SystemExit(f"{method} {url}: kept refusing")


def send(sample, out_path):
    rows = transactions(sample)
    calibration = [r for r in rows if r[1] <= CAL_END]
    today = dt.datetime.now(dt.timezone.utc).date()
    shift = today - CAL_END
    for tid, body in TRAITS.items():
        call("PUT", f"{PROFILES}/v1/computed-traits/{tid}", {"id": tid, **body})
    write = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    events = [{
        "type": "track", "event": "Order Completed", "userId": f"cdnow-{c}",
        "messageId": f"cdnow-{i}",
        "timestamp": f"{(d + shift).isoformat()}T12:00:00Z",
        "properties": {"total": v},
    } for i, (c, d, v) in enumerate(calibration)]
    started = time.time()
    for i in range(0, len(events), 100):
        call("POST", f"{INGEST}/v1/batch", {"batch": events[i:i + 100]}, auth=write)
    print(f"sent {len(events)} calibration orders of {len({c for c, _, _ in calibration})} "
          f"customers in {time.time() - started:.1f} s", file=sys.stderr)
    customers = sorted({c for c, _, _ in rows})
    expected = {}
    for c, _, _ in calibration:
        expected[c] = expected.get(c, 0) + 1

    def profile(c):
        status, p = call("GET", f"{PROFILES}/v1/profiles/lookup?type=user_id&value=cdnow-{c}"
                         "&explain=true")
        return p if status == 200 else None

    # Every order applied.
    while True:
        missing = [c for c in customers
                   if (p := profile(c)) is None or p["event_counts"].get("Order Completed", 0) < expected[c]]
        if not missing:
            break
        print(f"waiting for {len(missing)} customers", file=sys.stderr)
        time.sleep(2)
    asked = time.time() * 1000
    call("POST", f"{PROFILES}/v1/models/fit")
    while True:
        _, models = call("GET", f"{PROFILES}/v1/models")
        latest = {m["id"]: m["latest"] for m in models["models"] if m["id"] in TRAITS}
        if all(l and dt.datetime.fromisoformat(l["fitted_at"].replace("Z", "+00:00")).timestamp() * 1000 >= asked - 1000
               for l in latest.values()) and len(latest) == len(TRAITS):
            break
        time.sleep(1)
    versions = {k: v["version"] for k, v in latest.items()}
    print(f"fitted: {json.dumps({k: (v['customers'], v['fit_ms']) for k, v in latest.items()})}",
          file=sys.stderr)
    values = {}
    while True:
        stale = 0
        for c in customers:
            traits = profile(c)["computed_traits"]
            shown = {k: traits.get(k) for k in TRAITS}
            if any(not isinstance(v, dict) or v.get("model_version") != versions[k]
                   for k, v in shown.items()):
                stale += 1
                continue
            values[c] = {k: v["value"] for k, v in shown.items()}
            values[c]["as_of"] = shown["cdnow_alive"]["as_of"]
        if stale == 0:
            break
        print(f"waiting for {stale} profiles to be evaluated with the new models", file=sys.stderr)
        time.sleep(2)
    json.dump({"models": latest, "values": values, "today": today.isoformat()},
              open(out_path, "w"), indent=1)


def score(sample, out_path):
    import pandas as pd
    from lifetimes import BetaGeoFitter, GammaGammaFitter
    from lifetimes.utils import calibration_and_holdout_data
    got = json.load(open(out_path))
    rows = transactions(sample)
    df = pd.DataFrame(rows, columns=["customer", "date", "total"])
    df["date"] = pd.to_datetime(df["date"])
    s = calibration_and_holdout_data(df, "customer", "date", calibration_period_end=str(CAL_END),
                                     observation_period_end=str(HOLD_END), freq="D",
                                     monetary_value_col="total")
    bgf = BetaGeoFitter(penalizer_coef=0.0)
    bgf.fit(s["frequency_cal"], s["recency_cal"], s["T_cal"])
    s["lifetimes_pred"] = bgf.conditional_expected_number_of_purchases_up_to_time(
        HORIZON, s["frequency_cal"], s["recency_cal"], s["T_cal"])
    s["tessera_pred"] = [got["values"][str(c)]["cdnow_purchases_39w"] for c in s.index]
    s["tessera_alive"] = [got["values"][str(c)]["cdnow_alive"] for c in s.index]
    s["lifetimes_alive"] = bgf.conditional_probability_alive(s["frequency_cal"], s["recency_cal"], s["T_cal"])
    rep = s[s["frequency_cal"] > 0]
    ggf = GammaGammaFitter(penalizer_coef=0.0)
    ggf.fit(rep["frequency_cal"], rep["monetary_value_cal"])
    lt = bgf.params_
    m = got["models"]["cdnow_purchases_39w"]
    g = got["models"]["cdnow_value_39w"]["gamma_gamma"]
    actual = s["frequency_holdout"]
    as_of = {v["as_of"][:10] for v in got["values"].values()}
    print(f"customers {len(s)}, evaluated as of {sorted(as_of)} (today {got['today']}), "
          f"model v{m['version']} on {m['customers']} customers, fit {m['fit_ms']} ms")
    print("| | r | α (weeks) | a | b | ln L (weeks) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| paper (Fader, Hardie & Lee 2005) | {PAPER['r']} | {PAPER['alpha_weeks']} | {PAPER['a']} | {PAPER['b']} | −9582.4 |")
    print(f"| lifetimes 0.11.3, same data (days) | {lt['r']:.3f} | {lt['alpha'] / 7:.3f} | {lt['a']:.3f} | {lt['b']:.3f} | |")
    b = m["bgnbd"]
    # ln L in days differs from ln L in weeks by (r·n − Σx)... simply: report the platform's own.
    print(f"| Tessera, through the platform (days) | {b['r']:.3f} | {b['alpha'] / 7:.3f} | {b['a']:.3f} | {b['b']:.3f} | {m['bgnbd_fit']['log_likelihood']:.1f} (days) |")
    print()
    print(f"Gamma–Gamma: lifetimes p {ggf.params_['p']:.3f} q {ggf.params_['q']:.3f} ν {ggf.params_['v']:.3f}; "
          f"Tessera p {g['p']:.3f} q {g['q']:.3f} ν {g['gamma']:.3f}")
    print()
    mae = lambda col: (s[col] - actual).abs().mean()
    print("| hold-out, 39 weeks | repeat purchases, total | per customer, MAE |")
    print("| --- | ---: | ---: |")
    print(f"| actual | {actual.sum():.0f} | |")
    print(f"| lifetimes' prediction | {s['lifetimes_pred'].sum():.1f} | {mae('lifetimes_pred'):.4f} |")
    print(f"| Tessera's prediction | {s['tessera_pred'].sum():.1f} | {mae('tessera_pred'):.4f} |")
    print()
    diff = (s["tessera_pred"] - s["lifetimes_pred"]).abs().max()
    diff_alive = (s["tessera_alive"] - s["lifetimes_alive"]).abs().max()
    print(f"largest difference per customer from lifetimes: expected purchases {diff:.4f}, P(alive) {diff_alive:.4f}")


if __name__ == "__main__":
    {"send": send, "score": score}[sys.argv[1]](sys.argv[2], sys.argv[3])
