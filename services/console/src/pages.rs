//! The console's pages, rendered on the server from the services' JSON answers (maud
//! escapes every value it writes; nothing here builds HTML from strings). The one script,
//! `assets/console.js`, draws the charts, follows the live profile and runs the segment
//! builder; it reads what it needs from `data-` attributes.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use tessera_common::config::Config;

/// The page frame: navigation, the user and the logout form. `csrf` is the session's
/// token (the script sends it with every change).
pub fn layout(title: &str, user: Option<(&str, &str)>, active: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some((_, csrf)) = user { meta name="csrf-token" content=(csrf); }
                title { (title) " · Tessera" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Tessera" }
                    @if let Some((name, csrf)) = user {
                        nav {
                            @for (href, label) in [("/", "Pipeline"), ("/profiles", "Profiles"), ("/segments", "Segments"), ("/activations", "Activations")] {
                                a href=(href) class=@if label == active { "active" } { (label) }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            span.user { (name) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login(csrf: &str, error: Option<&str>, demo_hint: bool) -> Markup {
    layout(
        "Log in",
        None,
        "",
        html! {
            section.login {
                h1 { "Log in" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    label { "User" input name="user" autocomplete="username" required autofocus; }
                    label { "Password" input name="password" type="password" autocomplete="current-password" required; }
                    button type="submit" { "Log in" }
                }
                @if demo_hint {
                    p.hint { "Demo mode: the configured demo user is admin / tessera-demo (demo mode; a real deployment sets its own console.users)." }
                }
            }
        },
    )
}

/// A chart drawn by the script from the series whose names start with `prefixes`.
fn chart(title: &str, prefixes: &str, unit: &str) -> Markup {
    chart_or(title, prefixes, unit, "No readings yet.")
}

/// A chart that says `empty` while it has no series (e.g. no event was rejected).
fn chart_or(title: &str, prefixes: &str, unit: &str, empty: &str) -> Markup {
    html! {
        figure.chart data-chart=(prefixes) data-unit=(unit) data-empty=(empty) {
            figcaption { (title) }
            div.plot {}
            ul.legend {}
        }
    }
}

pub fn pipeline() -> Markup {
    html! {
        h1 { "Pipeline" }
        p.lead { "Read from the services' own /metrics every second; the charts keep the last 30 minutes." }
        div.status data-status="up." {}
        div.grid {
            (chart("Events accepted", "events.accepted", "/s"))
            (chart_or("Events rejected, by reason", "events.rejected.", "/s", "No event rejected since ingest started."))
            (chart("Event to profile update (p50, p99)", "latency.", "ms"))
            (chart_or("Event to activation (p50, p99)", "activation_latency.", "ms", "No activation yet."))
            (chart("Consumer lag, by service", "lag.", "records"))
            (chart("Segment entries", "segment.enter.", "/s"))
        }
    }
}

pub fn search(types: &[String], error: Option<&str>, csrf: &str) -> Markup {
    html! {
        h1 { "Find a person" }
        p.lead { "By any identifier. The value travels in the form's body, never in an address." }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.search method="post" action="/profiles/search" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Identifier type"
                select name="type" {
                    @for t in types { option value=(t) { (t) } }
                }
            }
            label.grow { "Value" input name="value" required autocomplete="off"; }
            button type="submit" { "Search" }
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

fn when(v: &Value) -> String {
    v.as_str()
        .map(|s| s.replace('T', " ").trim_end_matches('Z').to_string())
        .unwrap_or_else(|| "—".into())
}

/// The profile's page around its live panel.
pub fn profile(id: &str, panel: Markup) -> Markup {
    html! {
        section #profile data-profile-id=(id) {
            div.live-state { span.dot {} span #live-status { "connecting…" } }
            div #panel { (panel) }
        }
    }
}

/// Everything shown of a profile: the profiles API's 360 view (with provenance) and the
/// identity API's identifiers and merges. Re-rendered when the profile changes.
pub fn profile_panel(view: &Value, identity: Option<&Value>) -> Markup {
    let identifiers: Vec<Value> = identity
        .and_then(|i| i["identifiers"].as_array().cloned())
        .unwrap_or_else(|| view["identifiers"].as_array().cloned().unwrap_or_default());
    let merges = identity
        .and_then(|i| i["merges"].as_array().cloned())
        .unwrap_or_default();
    let mut events = view["recent_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    events.sort_by(|a, b| {
        b["received_at"]
            .as_str()
            .cmp(&a["received_at"].as_str())
            .then(b["timestamp"].as_str().cmp(&a["timestamp"].as_str()))
    });
    let empty = serde_json::Map::new();
    let traits = view["traits"].as_object().unwrap_or(&empty);
    let computed = view["computed_traits"].as_object().unwrap_or(&empty);
    let consent = view["consent"].as_object().unwrap_or(&empty);
    html! {
        h1 { "Profile " code { (text(&view["profile_id"])) } }
        dl.facts {
            dt { "First seen" } dd { (when(&view["first_seen"])) }
            dt { "Last seen" } dd #last-seen { (when(&view["last_seen"])) }
            dt { "Events" } dd #events-total { (text(&view["events_total"])) }
        }
        div.columns {
            section.card.wide {
                h2 { "Identifiers" }
                table { thead { tr { th { "Type" } th { "Value" } th { "Source" } th { "First seen" } } }
                    tbody { @for i in &identifiers { tr {
                        td { (text(&i["type"])) } td { (text(&i["value"])) }
                        td { (text(&i["source"])) } td { (when(&i["first_seen"])) }
                    } } }
                }
            }
            section.card {
                h2 { "Traits" }
                @if traits.is_empty() { p.none { "No traits yet." } }
                table.traits { tbody { @for (name, t) in traits { tr {
                    th { (name) }
                    td {
                        span.value { (text(&t["value"])) }
                        details.why {
                            summary { "why" }
                            dl {
                                dt { "Source" } dd { (text(&t["source"])) }
                                dt { "Event time" } dd { (when(&t["event_time"])) }
                                dt { "Message" } dd { code { (text(&t["message_id"])) } }
                                dt { "Strategy" } dd { (text(&t["strategy"]["strategy"])) }
                                @if let Some(c) = t.get("count") { dt { "Seen" } dd { (text(c)) " times" } }
                            }
                        }
                    }
                } } } }
            }
            section.card {
                h2 { "Computed traits" }
                @if computed.is_empty() { p.none { "None." } }
                table.traits { tbody { @for (name, v) in computed { tr {
                    th { (name) }
                    td {
                        @if let Some(features) = v.get("features").and_then(Value::as_object) {
                            // A propensity: its value, and the activity it was read from.
                            span.value { (text(&v["value"])) }
                            details.why {
                                summary { "why" }
                                dl {
                                    dt { "As of" } dd { (when(&v["as_of"])) }
                                    dt { "Model" } dd { "v" (text(&v["model_version"])) }
                                    @for (f, x) in features { dt { (f) } dd { (text(x)) } }
                                }
                            }
                        } @else if v.get("model_version").is_some() {
                            // A prediction: its value, and why (the customer's history
                            // and the model it was evaluated with).
                            span.value { (text(&v["value"])) }
                            details.why {
                                summary { "why" }
                                dl {
                                    dt { "Repeat purchases" } dd { (text(&v["frequency"])) }
                                    dt { "Last purchase" } dd { (text(&v["recency_days"])) " days after the first" }
                                    dt { "Customer for" } dd { (text(&v["age_days"])) " days" }
                                    dt { "As of" } dd { (when(&v["as_of"])) }
                                    dt { "Model" } dd { "v" (text(&v["model_version"])) }
                                    @let b = &v["parameters"]["bgnbd"];
                                    @if b.is_object() {
                                        dt { "BG/NBD" } dd { "r " (text(&b["r"])) ", α " (text(&b["alpha"])) " (days), a " (text(&b["a"])) ", b " (text(&b["b"])) }
                                    }
                                    @let g = &v["parameters"]["gamma_gamma"];
                                    @if g.is_object() {
                                        dt { "Gamma–Gamma" } dd { "p " (text(&g["p"])) ", q " (text(&g["q"])) ", γ " (text(&g["gamma"])) }
                                    }
                                }
                            }
                        } @else {
                            (text(v))
                        }
                    }
                } } } }
            }
            section.card {
                h2 { "Segments" }
                @let segments = view["segments"].as_array().cloned().unwrap_or_default();
                @if segments.is_empty() { p.none { "In no segment." } }
                table #segments { tbody { @for s in &segments { tr {
                    th { a href=(format!("/segments/{}", text(&s["id"]))) { (text(&s["id"])) } }
                    td { "since " (when(&s["entered_at"])) }
                } } } }
            }
            section.card {
                h2 { "Consent" }
                @if consent.is_empty() { p.none { "No decision recorded." } }
                table { tbody { @for (purpose, c) in consent { tr {
                    th { (purpose) }
                    td class=@if c["granted"] == Value::Bool(true) { "granted" } @else { "refused" } {
                        @if c["granted"] == Value::Bool(true) { "granted" } @else { "refused" }
                    }
                    td { (when(&c["event_time"])) } td { (text(&c["source"])) }
                } } } }
            }
            section.card {
                h2 { "Merge history" }
                @if merges.is_empty() { p.none { "Never merged." } }
                ol.merges { @for m in &merges { li {
                    (when(&m["event_time"])) ": absorbed " code { (text(&m["merged"])) }
                    " (" (text(&m["rule"]))
                    @if !m["score"].is_null() { ", score " (text(&m["score"])) }
                    ")"
                    @if m["undone"] == Value::Bool(true) { " — undone" }
                    @if let Some(fields) = m["explain"]["fields"].as_array() {
                        table.explain {
                            caption { "Why: match probability " (text(&m["explain"]["probability"]))
                                " (threshold " (text(&m["explain"]["threshold"])) ", parameters v"
                                (text(&m["explain"]["params_version"])) ")" }
                            tbody { @for f in fields { tr {
                                th { (text(&f["field"])) } td { (text(&f["level"])) }
                                td.weight { (text(&f["weight"])) " bits" }
                            } } }
                        }
                    }
                    @let ids = m["merged_identifiers"].as_array().cloned().unwrap_or_default();
                    @if !ids.is_empty() { ul { @for i in &ids { li { (text(&i["type"])) ": " (text(&i["value"])) } } } }
                } } }
            }
        }
        section.card.timeline {
            h2 { "Recent events" }
            @if events.is_empty() { p.none { "No events kept." } }
            ol #timeline { @for e in &events { li data-message-id=(text(&e["message_id"])) {
                time { (when(&e["timestamp"])) }
                span.kind { (text(&e["type"])) }
                @if let Some(name) = e["event"].as_str() { strong.event { (name) } }
                span.source { "from " (text(&e["source"])) }
                @if e["properties"].as_object().is_some_and(|p| !p.is_empty()) {
                    details { summary { "properties" } pre { (serde_json::to_string_pretty(&e["properties"]).unwrap_or_default()) } }
                }
            } } }
        }
    }
}

pub fn segments(list: &[Value]) -> Markup {
    html! {
        div.heading { h1 { "Segments" } a.button href="/segments/new" { "New segment" } }
        p.lead { "Sizes and rates are read every second; the line is the size over the last 30 minutes." }
        table.list {
            thead { tr { th { "Segment" } th { "Size" } th { "Over time" } th { "Entries /s" } th { "Exits /s" } th { "Version" } } }
            tbody { @for s in list {
                @let id = text(&s["id"]);
                tr {
                    td { a href=(format!("/segments/{id}")) { (id) } br; small { (text(&s["definition"]["name"])) } }
                    td.num data-latest=(format!("segment.size.{id}")) { (text(&s["size"])) }
                    td { div.spark data-chart=(format!("segment.size.{id}")) data-spark="1" { div.plot {} } }
                    td.num data-latest=(format!("segment.enter.{id}")) data-digits="2" { "—" }
                    td.num data-latest=(format!("segment.exit.{id}")) data-digits="2" { "—" }
                    td.num { (text(&s["version"])) }
                }
            } }
        }
    }
}

pub fn segment(s: &Value, members: &[Value]) -> Markup {
    let id = text(&s["id"]);
    html! {
        div.heading {
            h1 { "Segment " code { (id) } }
            a.button href=(format!("/segments/{id}/edit")) { "Edit in the builder" }
        }
        p.lead { (text(&s["definition"]["name"])) ". " (s["definition"]["description"].as_str().unwrap_or("")) }
        dl.facts {
            dt { "Live size" } dd.big data-latest=(format!("segment.size.{id}")) { (text(&s["size"])) }
            dt { "Entries /s" } dd data-latest=(format!("segment.enter.{id}")) data-digits="2" { "—" }
            dt { "Exits /s" } dd data-latest=(format!("segment.exit.{id}")) data-digits="2" { "—" }
            dt { "Version" } dd { (text(&s["version"])) " (" (text(&s["origin"])) ", " (when(&s["changed_at"])) ")" }
        }
        div.grid {
            (chart("Size", &format!("segment.size.{id}"), "profiles"))
            (chart("Entries and exits", &format!("segment.enter.{id},segment.exit.{id}"), "/s"))
        }
        section.card {
            h2 { "Definition" }
            pre { (serde_json::to_string_pretty(&s["definition"]).unwrap_or_default()) }
        }
        section.card {
            h2 { "Members (first " (members.len()) ")" }
            ul.members { @for m in members {
                @let pid = m["profile_id"].as_str().unwrap_or("");
                li { a href=(format!("/profiles/{pid}")) { code { (pid) } } " since " (when(&m["entered_at"])) }
            } }
        }
    }
}

/// The segment builder: the script renders the form from `data-initial` (a definition,
/// or nothing) and the lists of what conditions may name.
pub fn builder(
    initial: Option<&Value>,
    segments: &[String],
    computed: &[String],
    identifier_types: &[String],
    purposes: &[String],
) -> Markup {
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
    html! {
        h1 { @if initial.is_some() { "Edit segment" } @else { "New segment" } }
        p.lead { "Build the condition with the form; see the definition it makes, its size on today's profiles, then save it (the API keeps each version)." }
        div #builder
            data-initial=(initial.map(|v| v.to_string()).unwrap_or_default())
            data-segments=(json(segments))
            data-computed=(json(computed))
            data-identifiers=(json(identifier_types))
            data-purposes=(json(purposes)) {
            noscript { p.error { "The builder needs JavaScript; the API takes the same definitions (POST /v1/segments)." } }
        }
    }
}

pub fn activations(config: &Config, totals: &Value) -> Markup {
    let outcomes = [
        "sent",
        "suppressed",
        "no_consent",
        "no_address",
        "capped",
        "unchanged",
    ];
    html! {
        h1 { "Activations" }
        p.lead { "Records sent to each destination's topic, by outcome, since the activation service started; the charts show the rate." }
        @for d in &config.activation.destinations {
            section.card {
                h2 { (d.id) " " small { (serde_json::to_value(d.kind).ok().and_then(|k| k.as_str().map(str::to_string)).unwrap_or_default()) } }
                p {
                    @if !d.segments.is_empty() { "Segments: " (d.segments.join(", ")) ". " }
                    @if !d.triggers.is_empty() { "Triggers: " (d.triggers.join(", ")) ". " }
                    "Fields: " (d.fields.join(", ")) "."
                }
                table.outcomes { thead { tr { @for o in outcomes { th.num { (o.replace('_', " ")) } } } }
                    tbody { tr { @for o in outcomes {
                        td.num { (totals["activations"][&d.id][o].as_f64().map(|v| v.to_string()).unwrap_or_else(|| "0".into())) }
                    } } }
                }
                (chart("Rate by outcome", &format!("activation.{}.", d.id), "/s"))
            }
        }
        @if !config.activation.suppressions.is_empty() {
            section.card {
                h2 { "Suppressions" }
                ul { @for s in &config.activation.suppressions {
                    li { (s.id) ": members of " code { (s.segment) } " get nothing from "
                        @if s.destinations.is_empty() { "any destination" } @else { (s.destinations.join(", ")) } }
                } }
            }
        }
    }
}

/// An error page with the service's reason.
pub fn problem(title: &str, reason: &str) -> Markup {
    html! { h1 { (title) } p.error role="alert" { (reason) } p { a href="/" { "Back to the pipeline" } } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_values_are_escaped_everywhere_they_are_shown() {
        let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&";
        let view = json!({
            "profile_id": "p-1",
            "traits": {evil: {"value": evil, "source": evil, "message_id": evil, "strategy": {"strategy": "most_recent"}}},
            "computed_traits": {"c": evil, "p_active": {"value": 0.42, "model_version": 3,
                "frequency": 4, "recency_days": 120.0, "age_days": 300.0, "as_of": evil,
                "parameters": {"bgnbd": {"r": 0.24, "alpha": 30.9, "a": 0.79, "b": evil}}},
                "order_7d": {"value": 0.31, "model_version": 2, "as_of": evil,
                    "features": {"ln1p_target_7d": 0.69, evil: evil}}},
            "segments": [{"id": evil, "entered_at": "2026-01-01T00:00:00.000Z"}],
            "consent": {evil: {"granted": true, "source": evil}},
            "recent_events": [{"type": "track", "event": evil, "source": evil, "message_id": evil, "properties": {"x": evil}}],
        });
        let identity = json!({"identifiers": [{"type": "email", "value": evil, "source": evil}],
            "merges": [{"merged": evil, "rule": evil, "merged_identifiers": [{"type": "email", "value": evil}],
                "explain": {"probability": 0.9999, "threshold": 0.999, "params_version": 3,
                    "fields": [{"field": evil, "level": evil, "weight": 13.2}]}}]});
        let html = layout(
            "t",
            Some(("u", "c")),
            "",
            profile("p-1", profile_panel(&view, Some(&identity))),
        )
        .into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        // A fuzzy merge says why: each field's level and weight.
        assert!(
            html.contains("match probability 0.9999") && html.contains("13.2 bits"),
            "{html}"
        );
        // A prediction says why: the customer's history and the model's parameters.
        assert!(
            html.contains("0.42")
                && html.contains("Repeat purchases")
                && html.contains("r 0.24, α 30.9"),
            "{html}"
        );
        let seg = segments(&[json!({"id": evil, "definition": {"name": evil}})]).into_string();
        assert!(
            !seg.contains("<script>alert") && !seg.contains("<img src=x"),
            "{seg}"
        );
        let b = builder(
            Some(&json!({"name": evil})),
            &[evil.to_string()],
            &[],
            &[],
            &[],
        )
        .into_string();
        assert!(
            !b.contains("<script>alert") && !b.contains("<img src=x"),
            "{b}"
        );
    }
}
