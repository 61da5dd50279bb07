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
  // a delete asks once more: it cannot be undone
  document.querySelectorAll("form.act").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      var op = form.querySelector('select[name="op"]');
      if (op && op.value.indexOf("delete") === 0 &&
          !window.confirm(op.options[op.selectedIndex].text + ": this cannot be undone. Go on?")) {
        event.preventDefault();
      }
    });
  });
})();
// live pages (dashboard, diagnostics): the parts marked data-chart replaced from the page's JSON
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
          if (box) { box.innerHTML = doc.charts[name]; }
        });
        document.getElementById("updated").textContent = doc.updated;
      })
      .catch(function () {
        document.getElementById("updated").textContent = "Not updated: the console does not answer (log in again?)";
      })
      .then(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
