// smtpgw console: the little the pages need beyond HTML. Every page works without it.
(function () {
  "use strict";
  // "select every message" on a message list (shown only when this script runs)
  var all = document.getElementById("select-all");
  if (all) {
    all.parentNode.hidden = false;
    all.addEventListener("change", function () {
      document.querySelectorAll('input[name="id"][form="selection"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
  // a delete asks once more: it cannot be undone (on the document, so that forms a live page
  // puts in later ask too)
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches || !form.matches("form.act")) { return; }
    var op = form.querySelector('select[name="op"]');
    if (op && op.value.indexOf("delete") === 0 &&
        !window.confirm(op.options[op.selectedIndex].text + ": this cannot be undone. Go on?")) {
      event.preventDefault();
    }
  });
})();
// live pages (dashboard, diagnostics, cluster): the parts marked data-chart replaced from the page's JSON
// (data-poll) every data-every seconds, without reloading
(function () {
  "use strict";
  var board = document.querySelector("[data-poll]");
  if (!board || !window.fetch) { return; }
  var every = (parseInt(board.getAttribute("data-every"), 10) || 10) * 1000;
  function refresh() {
    fetch(board.getAttribute("data-poll"), {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (doc) {
        Object.keys(doc.charts).forEach(function (name) {
          var box = board.querySelector('[data-chart="' + name + '"]');
          // a part the keyboard focus is in (a form being filled) waits for the next round
          if (box && !box.contains(document.activeElement)) { box.innerHTML = doc.charts[name]; }
        });
        document.getElementById("updated").textContent = doc.updated;
        if (window.smtpgwMarkTables) { window.smtpgwMarkTables(); }
      })
      .catch(function () {
        document.getElementById("updated").textContent = "Not updated: the console does not answer (log in again?)";
      })
      .then(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
// a table wider than its box scrolls sideways in it: the keyboard can reach the box (arrow keys
// scroll it) and a screen reader names it by the table's caption
(function () {
  "use strict";
  function mark() {
    document.querySelectorAll(".table-box").forEach(function (box) {
      if (box.scrollWidth > box.clientWidth + 1) {
        var caption = box.querySelector("caption");
        box.setAttribute("tabindex", "0");
        box.setAttribute("role", "region");
        box.setAttribute("aria-label", (caption ? caption.textContent : "table") + " (scrolls sideways)");
      } else if (box.hasAttribute("tabindex")) {
        box.removeAttribute("tabindex");
        box.removeAttribute("role");
        box.removeAttribute("aria-label");
      }
    });
  }
  mark();
  window.addEventListener("resize", mark);
  window.smtpgwMarkTables = mark;
})();
