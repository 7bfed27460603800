// Drag-and-drop, preview and client-side checks for the upload form.
// Progressive enhancement only: the plain <input type="file"> form works without this script,
// and the server repeats every check. Loaded as a file (no inline script) so the CSP stays strict.
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  var dropZone = document.getElementById("drop-zone");
  var input = document.getElementById("file-input");
  if (!form || !dropZone || !input) {
    return;
  }
  var preview = document.getElementById("preview");
  var fileName = document.getElementById("file-name");
  var errorBox = document.getElementById("error-message");
  var submit = document.getElementById("submit-button");
  var dropTitle = document.getElementById("drop-title");
  var chooseText = dropTitle.textContent;

  var maxBytes = parseInt(form.getAttribute("data-max-bytes"), 10) || 0;
  var maxSize = form.getAttribute("data-max-size") || "";
  var accept = (form.getAttribute("data-accept") || "").split(",");
  var extensions = accept.filter(function (item) { return item.charAt(0) === "."; });
  var mimeTypes = accept.filter(function (item) { return item.indexOf("/") > 0; });
  var previewUrl = null;

  // With the script running, the drop zone itself is the control: the native input is hidden
  // visually (it stays focusable, so Tab, Enter and Space still reach it).
  form.classList.add("js-enabled");
  Array.prototype.forEach.call(document.querySelectorAll(".js-only"), function (el) {
    el.hidden = false;
  });

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function extensionOf(name) {
    var dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(dot).toLowerCase() : "";
  }

  // Returns an error message, or "" when the file looks acceptable.
  function check(file) {
    var ext = extensionOf(file.name);
    if (ext && extensions.indexOf(ext) === -1) {
      return "Only PNG, JPEG and DICOM files (" + extensions.join(", ") + ") are accepted.";
    }
    // Systems disagree on a type for .dcm (application/dicom, octet-stream or none); the
    // server checks the content anyway.
    if (file.type && ext !== ".dcm" && mimeTypes.indexOf(file.type) === -1) {
      return "This file is not a PNG, JPEG or DICOM image.";
    }
    if (file.size === 0) {
      return "The file is empty.";
    }
    if (maxBytes && file.size > maxBytes) {
      return "The file is larger than " + maxSize + ". Choose a smaller image.";
    }
    return "";
  }

  function formatSize(bytes) {
    if (bytes >= 1024 * 1024) {
      return (bytes / (1024 * 1024)).toFixed(1) + " MB";
    }
    return Math.max(1, Math.round(bytes / 1024)) + " KB";
  }

  function resetPreview() {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    preview.hidden = true;
    preview.removeAttribute("src");
    fileName.hidden = true;
    fileName.textContent = "";
    dropZone.classList.remove("has-file");
    dropTitle.textContent = chooseText;
  }

  function showPreview(file) {
    resetPreview();
    // The filename may name a patient, so even locally only the size is shown.
    fileName.textContent = "Selected image · " + formatSize(file.size);
    fileName.hidden = false;
    dropZone.classList.add("has-file");
    dropTitle.textContent = "Choose another image";
    // Browsers cannot draw DICOM; the result page shows what the model saw.
    var isDicom = extensionOf(file.name) === ".dcm" || file.type === "application/dicom";
    if (!isDicom && window.URL && URL.createObjectURL) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.hidden = false;
    }
  }

  function handleSelection() {
    clearError();
    var file = input.files && input.files[0];
    if (!file) {
      resetPreview();
      return;
    }
    var problem = check(file);
    if (problem) {
      input.value = "";
      resetPreview();
      showError(problem);
      return;
    }
    showPreview(file);
  }

  input.addEventListener("change", handleSelection);

  // A click anywhere in the zone opens the file chooser; the label and the input already do.
  dropZone.addEventListener("click", function (event) {
    if (event.target === input || event.target.closest("label")) {
      return;
    }
    input.click();
  });

  ["dragenter", "dragover"].forEach(function (type) {
    dropZone.addEventListener(type, function (event) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      dropZone.classList.add("is-dragover");
    });
  });

  ["dragleave", "dragend"].forEach(function (type) {
    dropZone.addEventListener(type, function (event) {
      // Moving between the zone's children also fires dragleave; only leaving the zone counts.
      if (!event.relatedTarget || !dropZone.contains(event.relatedTarget)) {
        dropZone.classList.remove("is-dragover");
      }
    });
  });

  dropZone.addEventListener("drop", function (event) {
    event.preventDefault();
    dropZone.classList.remove("is-dragover");
    var files = event.dataTransfer && event.dataTransfer.files;
    if (!files || files.length === 0) {
      return;
    }
    if (files.length > 1) {
      showError("Drop one image at a time.");
      return;
    }
    try {
      input.files = files;
    } catch (err) {
      showError("Your browser cannot take dropped files here; use the Choose an image button.");
      return;
    }
    handleSelection();
  });

  // A file dropped next to the drop zone must not make the browser navigate away from the form.
  ["dragover", "drop"].forEach(function (type) {
    window.addEventListener(type, function (event) {
      if (!dropZone.contains(event.target)) {
        event.preventDefault();
      }
    });
  });

  form.addEventListener("submit", function (event) {
    var file = input.files && input.files[0];
    var problem = file ? check(file) : "Choose an image first.";
    if (problem) {
      event.preventDefault();
      showError(problem);
      input.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Analysing…";
  });

  // Coming back with the browser's back button restores the page from cache; re-enable the form.
  window.addEventListener("pageshow", function () {
    submit.disabled = false;
    submit.textContent = "Analyse scan";
  });
})();
