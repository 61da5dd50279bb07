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
