"""The drift monitor's lines of ``/metrics``: a Prometheus collector read at scrape time (nothing per request)."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..monitor import DriftMonitor


class MonitorCollector(Collector):
    """``stagewise_monitor_*`` metrics of the service's current :class:`DriftMonitor` (``monitor()`` returns it)."""

    def __init__(self, monitor: Callable[[], DriftMonitor]):
        self._monitor = monitor

    def collect(self) -> Iterator:
        report = self._monitor().report()
        yield GaugeMetricFamily("stagewise_monitor_reference", "1 when the bundle has a calibration record to test "
                                "against", value=float(report["reference"]))
        yield GaugeMetricFamily("stagewise_monitor_alarm", "1 while an alarm is raised (until acknowledged or reloaded)",
                                value=float(report["alarm"]))
        yield CounterMetricFamily("stagewise_monitor_alarms", "alarms raised since the bundle was loaded",
                                  value=report["alarm_count"])
        yield GaugeMetricFamily("stagewise_monitor_evidence", "e-value of the drift test (alarm at the threshold)",
                                value=report["evidence"])
        yield GaugeMetricFamily("stagewise_monitor_threshold", "e-value threshold of the drift test",
                                value=report["threshold"])
        rates = GaugeMetricFamily("stagewise_monitor_exit_rate", "share of answers per stage, live and at calibration",
                                  labels=["operating_point", "stage", "source"])
        disagreement = GaugeMetricFamily("stagewise_monitor_disagreement", "agreement samples: share where the "
                                         "answer differs from the full model's, with its 95% interval",
                                         labels=["operating_point", "bound"])
        loss = GaugeMetricFamily("stagewise_monitor_loss", "agreement samples: estimated accuracy loss (fraction) "
                                 "with its 95% interval", labels=["operating_point", "bound"])
        samples = CounterMetricFamily("stagewise_monitor_agreement_samples", "requests checked against the full model",
                                      labels=["operating_point"])
        for name, point in report["points"].items():
            for stage in point["stages"]:
                if stage.get("exit_rate") is not None:
                    rates.add_metric([name, stage["stage"], "live"], stage["exit_rate"])
                if "reference_exit_rate" in stage:
                    rates.add_metric([name, stage["stage"], "calibration"], stage["reference_exit_rate"])
            a = point.get("agreement")
            if a:
                samples.add_metric([name], a["n"])
                for bound, d, v in (("estimate", a["disagreement"], a["loss"]),
                                    ("low", a["disagreement_interval"][0], a["loss_interval"][0]),
                                    ("high", a["disagreement_interval"][1], a["loss_interval"][1])):
                    disagreement.add_metric([name, bound], d)
                    loss.add_metric([name, bound], v)
        yield from (rates, disagreement, loss, samples)
