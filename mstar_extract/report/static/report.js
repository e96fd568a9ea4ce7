/* mstar report: draws the slide table and the contact sheet from the JSON embedded in report.html.
   Vanilla JS, no network. Every value goes into the page through textContent or attributes set from code
   (never innerHTML), so a slide id or an error text cannot inject markup. State lives in the URL hash:
   #view=table|sheet&q=...&status=...&flag=...&sort=...&dir=1|-1&page=N */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("mstar-data").textContent);
  var C = {};
  data.columns.forEach(function (c, i) { C[c] = i; });
  var ROWS = data.rows, A = data.assets, FLAGS = data.flags;
  var PAGE = { table: 100, sheet: 60 };
  var COLS = [["id", "slide"], ["status", "status"], ["n", "patches"], ["tissue_mm2", "tissue mm²"],
              ["ink", "ink"], ["mpp", "mpp"], ["mpp_src", "mpp source"], ["sec", "seconds"],
              ["flags", "flags"], ["err", "error"]];
  var NUMERIC = { n: 1, tissue_mm2: 1, ink: 1, mpp: 1, sec: 1 };
  var COLLATE = new Intl.Collator("en", { numeric: true }).compare;
  var state = { view: "table", q: "", status: "", flag: "", sort: "id", dir: 1, page: 1 };

  function readHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    p.forEach(function (v, k) {
      if (k in state) { state[k] = (k === "dir" || k === "page") ? (parseInt(v, 10) || 1) : v; }
    });
    if (!(state.view in PAGE)) { state.view = "table"; }
    if (!(state.sort in C)) { state.sort = "id"; }
  }
  function writeHash() {
    var p = new URLSearchParams();
    Object.keys(state).forEach(function (k) { p.set(k, String(state[k])); });
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* some browsers refuse on file: */ }
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function safeClass(s) { return String(s).replace(/[^a-z_]/g, ""); }
  function statusBadge(s) { return el("span", "status s-" + safeClass(s), String(s).replace(/_/g, " ")); }
  function flagBadges(list) {
    var f = document.createDocumentFragment();
    list.forEach(function (k) { f.appendChild(el("span", "flag f-" + safeClass(k), FLAGS[k] || k)); });
    return f;
  }
  function pageUrl(r) { return A + "/slides/" + r[C.a] + ".html"; }
  function fmt(col, v) {
    if (v === null || v === undefined || v === "") { return col === "err" || col === "mpp_src" ? "" : "–"; }
    if (col === "n") { return Number(v).toLocaleString("en"); }
    if (col === "ink") { return (100 * v).toFixed(1) + "%"; }
    if (col === "tissue_mm2") { return Number(v).toFixed(2); }
    if (col === "mpp") { return Number(v).toPrecision(4); }
    if (col === "sec") { return Number(v).toFixed(1); }
    return String(v);
  }

  function filtered() {
    var q = state.q.toLowerCase();
    var list = ROWS.filter(function (r) {
      if (state.status && r[C.status] !== state.status) { return false; }
      if (state.flag && r[C.flags].indexOf(state.flag) < 0) { return false; }
      if (q && (r[C.id] + "\n" + r[C.path] + "\n" + r[C.err]).toLowerCase().indexOf(q) < 0) { return false; }
      return true;
    });
    var i = C[state.sort], dir = state.dir, numeric = state.sort in NUMERIC;
    list.sort(function (a, b) {
      var x = a[i], y = b[i];
      if (state.sort === "flags") { x = x.length; y = y.length; }
      var nx = x === null || x === undefined || x === "", ny = y === null || y === undefined || y === "";
      if (nx || ny) { return nx === ny ? 0 : (nx ? 1 : -1); }  /* empty values last, both directions */
      if (numeric || state.sort === "flags") { return dir * (x - y); }
      return dir * COLLATE(String(x), String(y));
    });
    return list;
  }

  function drawTable(list) {
    var table = el("table", "slides"), head = el("tr");
    COLS.forEach(function (c) {
      var th = el("th", "sortable", c[1] + (state.sort === c[0] ? (state.dir > 0 ? " ▲" : " ▼") : ""));
      th.dataset.col = c[0];
      head.appendChild(th);
    });
    table.appendChild(el("thead")).appendChild(head);
    var body = table.appendChild(el("tbody"));
    list.forEach(function (r) {
      var tr = body.appendChild(el("tr"));
      tr.dataset.status = r[C.status];
      COLS.forEach(function (c) {
        var td = tr.appendChild(el("td", "c-" + c[0]));
        if (c[0] === "id") {
          var a = td.appendChild(el("a", "sid", r[C.id]));
          a.href = pageUrl(r);
        } else if (c[0] === "status") {
          td.appendChild(statusBadge(r[C.status]));
        } else if (c[0] === "flags") {
          td.appendChild(flagBadges(r[C.flags]));
        } else {
          td.textContent = fmt(c[0], r[C[c[0]]]);
        }
      });
    });
    return table;
  }

  function drawSheet(list) {
    var grid = el("div", "sheet");
    list.forEach(function (r) {
      var card = grid.appendChild(el("a", "tcard"));
      card.href = pageUrl(r);
      card.dataset.status = r[C.status];
      var box = card.appendChild(el("div", "thumb"));
      if (r[C.t]) {
        var img = box.appendChild(el("img"));
        img.loading = "lazy";
        img.alt = "";
        img.src = A + "/thumbs/" + r[C.a] + ".jpg";
      } else {
        box.appendChild(el("span", "nothumb", "no QC picture"));
      }
      var cap = card.appendChild(el("div", "cap"));
      cap.appendChild(el("span", "sid", r[C.id]));
      cap.appendChild(statusBadge(r[C.status]));
      cap.appendChild(el("span", "n", fmt("n", r[C.n]) + " patches"));
      cap.appendChild(flagBadges(r[C.flags]));
    });
    return grid;
  }

  function drawPager(total) {
    var per = PAGE[state.view], pages = Math.max(1, Math.ceil(total / per)), nav = document.getElementById("pager");
    state.page = Math.min(Math.max(1, state.page), pages);
    nav.textContent = "";
    [["« prev", state.page - 1], ["page " + state.page + " of " + pages, 0], ["next »", state.page + 1]].forEach(function (b) {
      var btn = nav.appendChild(el("button", b[1] ? "" : "label", b[0]));
      btn.type = "button";
      btn.disabled = !b[1] || b[1] < 1 || b[1] > pages;
      btn.dataset.page = b[1];
    });
  }

  function render() {
    var t0 = performance.now(), list = filtered(), per = PAGE[state.view];
    drawPager(list.length);
    var start = (state.page - 1) * per, shown = list.slice(start, start + per);
    var view = document.getElementById("view");
    view.textContent = "";
    view.appendChild(state.view === "sheet" ? drawSheet(shown) : drawTable(shown));
    document.getElementById("count").textContent = (list.length === ROWS.length ? "" :
      list.length.toLocaleString("en") + " of ") + ROWS.length.toLocaleString("en") + (ROWS.length === 1 ? " slide" : " slides");
    document.querySelectorAll(".tabs button").forEach(function (b) {
      b.classList.toggle("on", b.dataset.view === state.view);
    });
    document.getElementById("q").value = state.q;
    document.getElementById("status").value = state.status;
    document.getElementById("flag").value = state.flag;
    writeHash();
    document.documentElement.dataset.renderMs = (performance.now() - t0).toFixed(1);  /* read by the tests */
  }

  function set(changes) {
    Object.keys(changes).forEach(function (k) { state[k] = changes[k]; });
    render();
  }
  document.getElementById("q").addEventListener("input", function (e) { set({ q: e.target.value, page: 1 }); });
  document.getElementById("status").addEventListener("change", function (e) { set({ status: e.target.value, page: 1 }); });
  document.getElementById("flag").addEventListener("change", function (e) { set({ flag: e.target.value, page: 1 }); });
  document.querySelectorAll(".tabs button").forEach(function (b) {
    b.addEventListener("click", function () { set({ view: b.dataset.view, page: 1 }); });
  });
  document.querySelectorAll(".flagbar button").forEach(function (b) {
    b.addEventListener("click", function () { set({ flag: state.flag === b.dataset.flag ? "" : b.dataset.flag, page: 1 }); });
  });
  document.getElementById("view").addEventListener("click", function (e) {
    var th = e.target.closest("th.sortable");
    if (th) { set({ sort: th.dataset.col, dir: state.sort === th.dataset.col ? -state.dir : 1 }); }
  });
  document.getElementById("pager").addEventListener("click", function (e) {
    var b = e.target.closest("button");
    if (b && !b.disabled && b.dataset.page) { set({ page: parseInt(b.dataset.page, 10) }); }
  });
  readHash();
  render();
}());
