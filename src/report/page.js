// The drawing script of a `ferry report` page (inlined into it by
// src/report/html.ts, beside uPlot). It reads the chart specs from
// #report-data and draws each with uPlot; a chart with nothing to draw
// shows its note. When done it sets data-charts-drawn on <body> to the
// number of charts drawn and data-charts-total to the number of charts.
/* global uPlot */
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var root = document.getElementById('charts');
  var drawn = 0;
  data.charts.forEach(function (c) {
    var box = document.createElement('div');
    box.className = 'chart';
    box.id = 'chart-' + c.id;
    var h = document.createElement('h3');
    h.textContent = c.title + ' (' + c.unit + ')';
    box.appendChild(h);
    root.appendChild(box);
    var has = c.x.length > 0 && c.series.some(function (s) {
      return s.values.some(function (v) { return v !== null; });
    });
    if (!has) {
      var p = document.createElement('div');
      p.className = 'empty';
      p.textContent = c.empty || 'Nothing was recorded for this chart.';
      box.appendChild(p);
      box.dataset.drawn = 'empty';
      return;
    }
    var series = [{ label: 'time (s)', value: function (u, v) { return v == null ? '-' : v.toFixed(2) + ' s'; } }];
    c.series.forEach(function (s) {
      var o = { label: s.label, stroke: s.color, width: 1.5, spanGaps: !s.points };
      if (s.points) {
        o.paths = function () { return null; };
        o.points = { show: true, size: 6, stroke: s.color, fill: s.color };
      } else {
        o.points = { show: false };
      }
      if (s.step) o.paths = uPlot.paths.stepped({ align: 1 });
      if (s.dash) o.dash = [6, 4];
      series.push(o);
    });
    var width = Math.max(300, box.clientWidth - 16);
    var opts = {
      width: width,
      height: 220,
      series: series,
      scales: { x: { time: false } },
      axes: [{ label: 'seconds since migrate' }, { label: c.unit, size: 60 }],
      legend: { show: true },
    };
    new uPlot(opts, [c.x].concat(c.series.map(function (s) { return s.values; })), box);
    box.dataset.drawn = 'yes';
    drawn++;
  });
  document.body.dataset.chartsDrawn = String(drawn);
  document.body.dataset.chartsTotal = String(data.charts.length);
})();
