// apipool dashboard: small progressive enhancements. Pages work without this script; it adds
// local times, confirmations, reading a file into the import box and live charts (SVG).
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";

  function localTimes(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) {
        t.title = t.getAttribute("datetime");
        t.textContent = d.toLocaleString();
      }
    });
  }

  function confirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) {
        if (!window.confirm(f.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
  }

  function fileFill() {
    document.querySelectorAll("input[type=file][data-fill]").forEach(function (input) {
      input.addEventListener("change", function () {
        var target = document.getElementById(input.getAttribute("data-fill"));
        var file = input.files && input.files[0];
        if (!target || !file) return;
        var reader = new FileReader();
        reader.onload = function () { target.value = String(reader.result); target.focus(); };
        reader.readAsText(file);
      });
    });
  }

  function el(name, attrs, text) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function empty(node, text) {
    clear(node);
    var p = document.createElement("p");
    p.className = "muted";
    p.textContent = text;
    node.appendChild(p);
  }

  function hhmm(d, long) {
    return long ? d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " +
      d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  }

  // Stacked bars over time: points [{start, success, failed}], dense over [now - window, now].
  function timeChart(node, data) {
    var step = data.interval_ms, end = Date.parse(data.now), start = end - data.window * 1000;
    var first = Math.floor(start / step) * step, n = Math.max(1, Math.ceil((end - first) / step));
    var ok = new Array(n).fill(0), bad = new Array(n).fill(0);
    data.timeline.forEach(function (p) {
      var i = Math.floor((Date.parse(p.start) - first) / step);
      if (i >= 0 && i < n) { ok[i] += p.success; bad[i] += p.failed; }
    });
    var max = 0;
    for (var i = 0; i < n; i++) max = Math.max(max, ok[i] + bad[i]);
    if (max === 0) { empty(node, "No calls in this window yet."); return; }
    var W = Math.max(320, Math.round(node.clientWidth || 640)), H = 200, L = 36, B = 22, T = 8, w = (W - L - 4) / n;
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "svg-chart", "aria-hidden": "true" });
    svg.appendChild(el("line", { x1: L, y1: H - B, x2: W, y2: H - B, class: "axis" }));
    svg.appendChild(el("text", { x: L - 4, y: T + 8, class: "tick", "text-anchor": "end" }, String(max)));
    svg.appendChild(el("text", { x: L - 4, y: H - B, class: "tick", "text-anchor": "end" }, "0"));
    for (i = 0; i < n; i++) {
      var x = L + i * w, hOk = (H - B - T) * ok[i] / max, hBad = (H - B - T) * bad[i] / max;
      var title = hhmm(new Date(first + i * step), data.window > 86400) + ": " + (ok[i] + bad[i]) + " calls, " + bad[i] + " not successful";
      if (ok[i]) { var r = el("rect", { x: x + 0.5, y: H - B - hOk, width: Math.max(1, w - 1), height: hOk, class: "bar-ok" }); r.appendChild(el("title", {}, title)); svg.appendChild(r); }
      if (bad[i]) { var r2 = el("rect", { x: x + 0.5, y: H - B - hOk - hBad, width: Math.max(1, w - 1), height: hBad, class: "bar-bad" }); r2.appendChild(el("title", {}, title)); svg.appendChild(r2); }
    }
    var ticks = 4;
    for (var t = 0; t <= ticks; t++) {
      var ti = Math.round(t * (n - 1) / ticks);
      var anchor = t === 0 ? "start" : (t === ticks ? "end" : "middle");
      var tx = t === 0 ? L : (t === ticks ? W - 2 : L + ti * w + w / 2);
      svg.appendChild(el("text", { x: tx, y: H - 6, class: "tick", "text-anchor": anchor }, hhmm(new Date(first + ti * step), data.window > 86400)));
    }
    clear(node);
    node.appendChild(svg);
    var total = ok.reduce(function (a, b) { return a + b; }, 0) + bad.reduce(function (a, b) { return a + b; }, 0);
    node.setAttribute("data-total", String(total));
  }

  // Horizontal bars: [[label, value], ...].
  function barChart(node, items) {
    if (!items.length) { empty(node, "No calls in this window yet."); return; }
    items = items.slice(0, 15);
    var max = Math.max.apply(null, items.map(function (i) { return i[1]; })) || 1;
    var W = Math.max(320, Math.round(node.clientWidth || 640)), row = 22, L = 160, H = items.length * row + 4;
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "svg-chart", "aria-hidden": "true" });
    items.forEach(function (it, i) {
      var y = 2 + i * row, w = (W - L - 60) * it[1] / max;
      svg.appendChild(el("text", { x: L - 6, y: y + 15, class: "tick", "text-anchor": "end" }, it[0].length > 22 ? it[0].slice(0, 21) + "…" : it[0]));
      svg.appendChild(el("rect", { x: L, y: y + 3, width: Math.max(1, w), height: row - 6, class: "bar-ok" }));
      svg.appendChild(el("text", { x: L + w + 6, y: y + 15, class: "tick" }, String(it[1])));
    });
    clear(node);
    node.appendChild(svg);
    node.setAttribute("data-total", String(items.reduce(function (a, b) { return a + b[1]; }, 0)));
  }

  function stamp() {
    var s = document.getElementById("live-updated");
    if (s) s.textContent = "updated " + new Date().toLocaleTimeString();
  }

  function poll(url, draw, every) {
    function run() {
      fetch(url(), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(String(r.status)); return r.json(); })
        .then(function (d) { draw(d); stamp(); })
        .catch(function () { var s = document.getElementById("live-updated"); if (s) s.textContent = "live data unavailable"; });
    }
    run();
    return setInterval(run, every);
  }

  function poolPage() {
    var summary = document.getElementById("pool-summary");
    if (!summary) return;
    var select = document.getElementById("chart-window");
    var url = function () { return summary.getAttribute("data-live") + "?window=" + (select ? select.value : "3600"); };
    var draw = function (d) {
      timeChart(document.getElementById("timeline-chart"), d);
      barChart(document.getElementById("usage-chart"), d.usage);
      var u = document.getElementById("stat-usable"); if (u) u.textContent = d.available + " / " + d.total;
      var c = document.getElementById("stat-calls"); if (c) c.textContent = String(d.calls_24h);
      var s = document.getElementById("stat-success"); if (s) s.textContent = d.success_24h;
      d.keys.forEach(function (k) {
        document.querySelectorAll("#members-table tr").forEach(function (tr) {
          if (tr.getAttribute("data-key") !== k.key_identifier) return;
          var st = tr.querySelector("[data-field=state]"); if (st) { st.textContent = k.state; st.className = "badge badge-" + k.state; }
          var sk = tr.querySelector("[data-field=skipped]"); if (sk) sk.textContent = k.available ? "–" : (k.skipped_because || "");
        });
      });
    };
    var timer = poll(url, draw, 5000);
    if (select) select.addEventListener("change", function () { clearInterval(timer); timer = poll(url, draw, 5000); });
  }

  function overviewPage() {
    var chart = document.getElementById("overview-chart");
    if (!chart) return;
    poll(function () { return chart.getAttribute("data-live"); }, function (d) { timeChart(chart, d); }, 10000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes();
    confirmations();
    fileFill();
    poolPage();
    overviewPage();
    var err = document.querySelector("[aria-invalid=true]");
    if (err) err.focus();
  });
})();
