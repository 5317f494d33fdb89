"""Writes the Grafana dashboards in dashboards/ from the panel lists below (the one place to edit).

    python deploy/grafana/build_dashboards.py           # rewrite dashboards/*.json
    python deploy/grafana/build_dashboards.py --check   # exit 1 if a committed file is out of date

Every query names only metrics the services export (tests/test_deploy_observability.py scrapes the
running services and checks), and every exported mmupt metric appears on some panel. Queries use no
`job` label, so they work with the compose scrape config and with any Kubernetes scrape job.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]        # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"              # or "stat"
    width: int = 12
    height: int = 8
    extra: dict = field(default_factory=dict)


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return Panel(title, [(expr, "")], unit, description, kind="stat", width=6, height=4)


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    """p50 and p90 of a histogram, optionally per label (e.g. per instance)."""
    group = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", f"{legend}p{int(q * 100)}")
            for q in (0.5, 0.9)]


def mean(metric: str, by: str = "") -> str:
    """Mean of a histogram's observations over the rate window."""
    agg = f"sum by ({by})" if by else "sum"
    return f"{agg} (rate({metric}_sum[{RATE}])) / {agg} (rate({metric}_count[{RATE}]))"


def per_second(metric: str, by: str = "") -> str:
    agg = f"sum by ({by})" if by else "sum"
    return f"{agg} (rate({metric}[{RATE}]))"


# ---- the dashboards ---------------------------------------------------------------------------------

OVERVIEW = [
    stat("Learner version", "max(mmupt_learner_policy_version)", description="Optimizer steps taken."),
    stat("Groups in flight", "sum(mmupt_learner_groups_in_flight)",
         description="Admitted prompts not yet trained, dropped or dead-lettered."),
    stat("Dead letters", 'max(mmupt_stream_length{stream="deadletter"})',
         description="Entries that could not be processed (kept with the reason)."),
    stat("Mean reward", "avg(mmupt_learner_mean_reward)", "percentunit",
         "Share of responses that agree with their group's majority, last step."),
    Panel("Policy versions", [("max(mmupt_learner_policy_version)", "learner"),
                              ("mmupt_rollout_policy_version", "rollout {{instance}}")],
          description="The learner's version and the version each rollout server serves."),
    # Clamped at 0: the learner and a rollout server are scraped at different instants, so right
    # after a push the server can look a version ahead.
    Panel("Version lag", [("clamp_min(scalar(max(mmupt_learner_policy_version)) - mmupt_rollout_policy_version, 0)",
                           "served lag {{instance}}"),
                          (mean("mmupt_learner_version_lag"), "mean lag of trained groups")],
          description="How far rollouts trail the learner. Groups older than max_staleness are dropped."),
    Panel("Throughput (groups/s)", [(per_second("mmupt_rollout_groups_total"), "rollout: sampled"),
                                    (per_second("mmupt_voter_groups_total"), "voter: voted"),
                                    (per_second("mmupt_learner_groups_trained_total"), "learner: trained"),
                                    (per_second("mmupt_learner_prompts_admitted_total"), "learner: admitted")],
          "ops"),
    Panel("Training steps per minute", [(f"sum(rate(mmupt_learner_steps_total[{RATE}])) * 60", "steps/min")]),
    Panel("Stream lengths (unfinished work)", [("mmupt_stream_length", "{{stream}}")],
          description="Processed entries are deleted, so length is work not yet done; producers wait at "
                      "streams.max_len (back-pressure)."),
    Panel("Stream pending (delivered, not acked)", [("mmupt_stream_pending", "{{stream}}")],
          description="Entries held by a consumer; a crashed consumer's entries are reclaimed after claim_idle_ms."),
    Panel("Where admitted prompts went (per second)",
          [(per_second("mmupt_learner_groups_trained_total"), "trained"),
           (per_second("mmupt_learner_groups_dropped_stale_total"), "dropped stale"),
           (per_second("mmupt_learner_deadlettered_total"), "dead-lettered by learner"),
           (per_second("mmupt_learner_duplicate_groups_total"), "duplicates ignored")],
          "ops", "admitted = trained + dropped stale + dead-lettered + in flight."),
    Panel("Dead letters per service (per second)",
          [(per_second("mmupt_rollout_deadlettered_total"), "rollout"),
           (per_second("mmupt_voter_deadlettered_total"), "voter"),
           (per_second("mmupt_learner_deadlettered_total"), "learner")], "ops"),
]

ROLLOUT = [
    Panel("Generated tokens/s", [(per_second("mmupt_rollout_generated_tokens_total", "instance"), "{{instance}}")]),
    Panel("Groups sampled/s", [(per_second("mmupt_rollout_groups_total", "instance"), "{{instance}}")], "ops"),
    Panel("Time to sample one group", quantiles("mmupt_rollout_group_seconds"), "s"),
    Panel("Prompt queue", [('sum(mmupt_stream_length{stream="prompts"})', "waiting"),
                           ('sum(mmupt_stream_pending{stream="prompts"})', "being sampled")],
          description="The prompts stream: admitted by the learner, consumed by rollout servers."),
    Panel("Weight swap time", quantiles("mmupt_rollout_weight_swap_seconds"), "s",
          "Swapping a verified push in; generation waits for it."),
    Panel("Waiting for weights", [("mmupt_rollout_waiting_for_weights", "{{instance}}")],
          description="1 while a server is more than max_staleness versions behind and takes no training prompts."),
    Panel("Decode speed of the last backend call", [("mmupt_rollout_tokens_per_second", "{{instance}}")],
          description="Generated tokens per second of the most recent generate call, per server."),
    Panel("Prompt tokens/s", [(per_second("mmupt_rollout_prompt_tokens_total", "instance"), "{{instance}}")]),
    Panel("API requests/s by status", [(per_second("mmupt_rollout_requests_total", "endpoint, status"),
                                        "{{endpoint}} {{status}}")], "ops",
          "OpenAI-style chat completions, /v1/rollout, /v1/eval; 4xx are refused inputs."),
    Panel("API latency", quantiles("mmupt_rollout_request_seconds", "endpoint"), "s", "Queueing included."),
    Panel("API queue", [("sum(mmupt_rollout_queue_depth)", "waiting"),
                        ("sum(mmupt_rollout_requests_in_flight)", "generating")],
          description="The bounded request queue; when full, requests get 429 with Retry-After."),
    Panel("API requests refused for load", [(per_second("mmupt_rollout_rejected_total", "reason"), "{{reason}}")],
          "ops", "queue_full: 429; queue_timeout: 503 (waited longer than rollout.queue_timeout_s)."),
    Panel("Evaluation jobs", [(per_second("mmupt_rollout_eval_jobs_total", "outcome"), "{{outcome}}")], "ops"),
]

VOTER = [
    Panel("Majority ratio", [(mean("mmupt_voter_majority_ratio"), "mean")]
          + quantiles("mmupt_voter_majority_ratio"), "percentunit",
          "Share of a group in its majority class. Near 1 everywhere: the vote collapses (no learning signal)."),
    Panel("Vote entropy (nats)", [(mean("mmupt_voter_vote_entropy"), "mean")], "short",
          "Entropy of a group's answer classes; falling towards 0 means less diversity."),
    Panel("No-answer rate", [(f"{per_second('mmupt_voter_no_answer_total')} / "
                              f"{per_second('mmupt_voter_responses_total')}", "responses without \\boxed{}"),
                             (mean("mmupt_voter_no_answer_rate"), "mean per group")],
          "percentunit", "Responses without an extractable final answer get reward 0."),
    Panel("Unanimous groups", [(f"{per_second('mmupt_voter_unanimous_groups_total')} / "
                                f"{per_second('mmupt_voter_groups_total')}", "unanimous share")],
          "percentunit", "Every response agrees: zero advantage, only the KL term acts."),
    Panel("Label accuracy (monitoring)", [(f"{per_second('mmupt_voter_label_correct_total')} / "
                                           f"{per_second('mmupt_voter_labelled_groups_total')}", "majority == label")],
          "percentunit", "Only where a hidden label rides along; never used for rewards in majority mode."),
    Panel("Reward accuracy and pass@N (monitoring)",
          [(f"{per_second('mmupt_voter_reward_agree_total')} / {per_second('mmupt_voter_labelled_responses_total')}",
            "pseudo reward == true reward"),
           (f"{per_second('mmupt_voter_pass_at_n_total')} / {per_second('mmupt_voter_labelled_groups_total')}",
            "pass@N (some response right)")],
          "percentunit", "TTRL-style monitoring where a hidden label rides along. pass@N falling: diversity collapse."),
    Panel("Ties and dropped groups", [(f"{per_second('mmupt_voter_tied_groups_total')} / "
                                       f"{per_second('mmupt_voter_groups_total')}", "tied share"),
                                      (per_second("mmupt_voter_dropped_groups_total", "reason"), "dropped/s {{reason}}")],
          description="Groups whose top classes tie, and groups the vote policy drops (tie policy, min agreement)."),
    Panel("Symbolic comparisons out of time", [(per_second("mmupt_voter_compare_timeouts_total"), "timeouts/s")],
          "ops", "Comparisons cut off by voter.compare_timeout_s (counted as not equal): hostile or huge answers."),
    stat("Voter configuration", 'count by (reward_mode, grader, tie_policy) (mmupt_voter_info)',
         description="reward_mode, grader and tie policy of the running voters (legend)."),
    Panel("Groups voted/s", [(per_second("mmupt_voter_groups_total", "reward_mode"), "{{reward_mode}}"),
                             (per_second("mmupt_voter_responses_total"), "responses")], "ops"),
    Panel("Time to vote one group", quantiles("mmupt_voter_group_seconds"), "s"),
    Panel("Group queue", [('sum(mmupt_stream_length{stream="groups"})', "waiting"),
                          ('sum(mmupt_stream_pending{stream="groups"})', "being voted")]),
]

LEARNER = [
    Panel("Loss terms", [("mmupt_learner_loss", "{{term}}")], description="Last step: total, policy gradient, KL."),
    Panel("KL", [('mmupt_learner_loss{term="kl"}', "KL to the initial policy (k3)"),
                 ('mmupt_learner_step_stat{stat="mismatch_kl"}', "behaviour vs proximal policy")]),
    Panel("Clip fractions", [('mmupt_learner_step_stat{stat="clip_frac"}', "clipped"),
                             ('mmupt_learner_step_stat{stat="dual_clip_frac"}', "dual-clipped")], "percentunit"),
    Panel("Grad norm", [('mmupt_learner_step_stat{stat="grad_norm"}', "grad norm")]),
    Panel("Entropy and importance weight", [('mmupt_learner_step_stat{stat="entropy"}', "token entropy"),
                                            ('mmupt_learner_step_stat{stat="is_weight_mean"}', "mean IS weight")]),
    Panel("Mean reward", [("mmupt_learner_mean_reward", "last step")], "percentunit"),
    Panel("Trained tokens/s", [(per_second("mmupt_learner_tokens_total"), "tokens/s (rate)"),
                               ("mmupt_learner_tokens_per_second", "last step")]),
    Panel("Optimizer step and checkpointed work", [("mmupt_learner_step", "optimizer step"),
                                                   ("mmupt_learner_groups_uncommitted", "groups awaiting a checkpoint")],
          description="Groups trained since the last checkpoint stay in Redis (learner:replay) until it is written."),
    Panel("Weight export and checkpoint time", quantiles("mmupt_learner_export_seconds")
          + [(f"histogram_quantile(0.9, sum by (le) (rate(mmupt_learner_checkpoint_seconds_bucket[{RATE}])))",
              "checkpoint p90")], "s", "Gathering the full weights for a push (ZeRO-3), and writing a checkpoint."),
    Panel("Time waiting for scored groups", [(per_second("mmupt_learner_wait_seconds_total"), "share of time")],
          "percentunit", "Near 1: the learner is starved; add rollout servers."),
    Panel("Step time", quantiles("mmupt_learner_step_seconds"), "s", "Forward and backward of one optimizer step."),
    Panel("Version lag of trained groups", quantiles("mmupt_learner_version_lag")
          + [(mean("mmupt_learner_version_lag"), "mean")], description="Learner version minus sampling version."),
    Panel("Stale drops and duplicates (per second)",
          [(per_second("mmupt_learner_groups_dropped_stale_total"), "dropped stale"),
           (per_second("mmupt_learner_groups_skipped_zero_advantage_total"), "skipped (zero advantage)"),
           (per_second("mmupt_learner_duplicate_groups_total"), "duplicates")], "ops"),
    Panel("Scored queue", [('sum(mmupt_stream_length{stream="scored"})', "waiting"),
                           ('sum(mmupt_stream_pending{stream="scored"})', "buffered by the learner")]),
]

WEIGHT_SYNC = [
    Panel("Push time (all servers)", quantiles("mmupt_weight_push_seconds"), "s",
          "One version pushed to every live rollout server (gRPC or collective broadcast)."),
    Panel("Push failures and retries (per second)",
          [(per_second("mmupt_weight_push_failures_total", "server"), "failures {{server}}"),
           (per_second("mmupt_weight_push_retries_total", "server"), "retries {{server}}")], "ops"),
    Panel("Servers the last push missed", [("max(mmupt_weight_push_failed_servers)", "failed servers")],
          description="Servers that did not get the last version; the cold sync retries them every second."),
    Panel("Weight bytes delivered/s", [(per_second("mmupt_weight_push_bytes_total"), "bytes/s")], "Bps",
          "Wire bytes of versions delivered, summed over servers (bfloat16 on the wire halves them)."),
    Panel("Transfers being staged", [("mmupt_rollout_weight_transfer_active", "{{instance}}")],
          description="1 while a server stages a pushed version (it keeps serving the last one meanwhile)."),
    Panel("Pushes received by outcome (per second)",
          [(per_second("mmupt_rollout_weight_pushes_total", "instance, outcome"), "{{instance}} {{outcome}}")], "ops",
          "ok, refused_old (already newer), unauthenticated (wrong token), invalid (failed verification)."),
    Panel("Swap time per server", quantiles("mmupt_rollout_weight_swap_seconds", "instance"), "s"),
    Panel("Served version vs learner", [("max(mmupt_learner_policy_version)", "learner"),
                                        ("mmupt_rollout_policy_version", "{{instance}}")]),
    Panel("Waiting for weights", [("mmupt_rollout_waiting_for_weights", "{{instance}}")]),
]

DASHBOARDS = {
    "mmupt-overview": ("mmupt: overview", OVERVIEW),
    "mmupt-rollout": ("mmupt: rollout", ROLLOUT),
    "mmupt-voter": ("mmupt: voter", VOTER),
    "mmupt-learner": ("mmupt: learner", LEARNER),
    "mmupt-weight-sync": ("mmupt: weight sync", WEIGHT_SYNC),
}


# ---- Grafana JSON ------------------------------------------------------------------------------------

def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
               for i, (expr, legend) in enumerate(panel.queries)]
    out = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "none"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area"}
    out.update(panel.extra)
    return out


def dashboard_json(uid: str, title: str, panels: list[Panel]) -> dict:
    laid_out, x, y, row_height = [], 0, 0, 0
    for i, panel in enumerate(panels, start=1):
        if x + panel.width > 24:  # next row
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(panel_json(panel, i, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": uid, "title": title, "tags": ["mmupt"], "editable": True, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["mmupt"], "title": "mmupt", "asDropdown": True,
                   "includeVars": True, "keepTime": True}],
        "panels": laid_out,
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{uid}.json": json.dumps(dashboard_json(uid, title, panels), indent=2) + "\n"
            for uid, (title, panels) in DASHBOARDS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed dashboard differs")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(path)
    if stale:
        print(f"out of date (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
