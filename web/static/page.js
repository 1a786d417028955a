// The job server's pages, made live: times in the browser's zone, a running job's log and status without
// reloading, and a keyed template's key kept in this tab (sessionStorage) and sent as an X-ApiKey header.
// Everything a job or a request produced is put in the page with textContent, never as HTML.
"use strict";

(function () {
  const MAX_ENTRIES = 5000; // log entries kept in the page; earlier ones can be loaded again
  const FIRST_DELAY = 500; // ms between polls while the log moves; it backs off to SLOWEST while it does not
  const SLOWEST = 5000;

  function keyName(template) {
    return "jobserver-key:" + template.toLowerCase();
  }

  function storedKey(template) {
    try {
      return sessionStorage.getItem(keyName(template));
    } catch (error) {
      return null;
    }
  }

  function storeKey(template, key) {
    try {
      sessionStorage.setItem(keyName(template), key);
    } catch (error) {
      // storage refused: the key is asked again on the next page
    }
  }

  function forgetKey(template) {
    try {
      sessionStorage.removeItem(keyName(template));
    } catch (error) {
      // nothing kept
    }
  }

  function localTimes(root) {
    for (const element of root.querySelectorAll("time[datetime]")) {
      const moment = new Date(element.dateTime);
      if (!isNaN(moment)) {
        element.textContent = moment.toLocaleString();
        element.title = element.dateTime;
      }
    }
  }

  function moment(seconds) {
    if (seconds === null || seconds === undefined) {
      return null;
    }
    const element = document.createElement("time");
    element.dateTime = new Date(seconds * 1000).toISOString().replace(/\.\d+Z$/, "Z");
    element.textContent = new Date(seconds * 1000).toLocaleString();
    return element;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) {
      return "";
    }
    if (seconds < 60) {
      return seconds.toFixed(1) + " s";
    }
    const whole = Math.floor(seconds);
    const hours = Math.floor(whole / 3600);
    const minutes = Math.floor((whole % 3600) / 60);
    const rest = whole % 60;
    const two = (n) => String(n).padStart(2, "0");
    return hours ? hours + " h " + two(minutes) + " min" : minutes + " min " + two(rest) + " s";
  }

  function statusWord(status) {
    const word = document.createElement("span");
    word.className = "status status-" + status.toLowerCase();
    word.textContent = status;
    return word;
  }

  function replace(element, child) {
    element.replaceChildren(...(child ? [child] : []));
  }

  function entryItem(level, message) {
    const item = document.createElement("li");
    item.className = "entry level-" + level.toLowerCase();
    const levelText = document.createElement("span");
    levelText.className = "level";
    levelText.textContent = level;
    const messageText = document.createElement("span");
    messageText.className = "message";
    messageText.textContent = message;
    item.append(levelText, " ", messageText);
    return item;
  }

  // The job page.

  function jobPage(article) {
    const token = article.dataset.token;
    const template = article.dataset.template;
    const keyed = article.dataset.keyed === "true";
    const log = document.getElementById("log");
    const details = document.getElementById("job-details");
    const earlier = document.getElementById("log-earlier");
    const earlierButton = document.getElementById("load-earlier");
    const hiddenCount = document.getElementById("log-hidden-count");
    const state = document.getElementById("log-state");
    let offset = Number(article.dataset.offset);
    let first = Number(article.dataset.first);
    let final = article.dataset.final === "true";
    let unlocked = article.dataset.unlocked === "true";
    let key = keyed ? storedKey(template) : null;
    let delay = FIRST_DELAY;
    let timer = null;
    let running = null; // {duration, at}: the job's duration as last told, and when
    let following = true; // the page keeps the log's end in view until the person scrolls up

    function headers() {
      return key ? {"X-ApiKey": key} : {};
    }

    function ask(query) {
      return fetch("/jobs/" + encodeURIComponent(token) + "/updates?" + query, {
        headers: headers(), credentials: "same-origin", cache: "no-store",
      });
    }

    function showEarlier() {
      earlier.hidden = first === 0;
      earlierButton.hidden = first === 0;
      hiddenCount.textContent = String(first);
      log.start = first + 1;
    }

    function fillKeys() {
      for (const input of document.querySelectorAll("input.needs-key")) {
        input.value = key;
        input.hidden = true;
        const label = document.querySelector('label[for="' + input.id + '"]');
        if (label) {
          label.hidden = true;
        }
      }
    }

    function apply(update) {
      replace(document.getElementById("job-status"), statusWord(update.status));
      replace(document.getElementById("job-started"), moment(update.times.started));
      replace(document.getElementById("job-finished"), moment(update.times.finished));
      document.getElementById("job-duration").textContent = duration(update.times.duration);
      running = update.final || update.times.duration === null ? null : {duration: update.times.duration, at: Date.now()};
      final = update.final;
      if (final) {
        const cancel = document.getElementById("cancel-form");
        if (cancel) {
          cancel.hidden = true;
        }
        state.textContent = "";
      } else {
        state.textContent = "The job is running: new entries appear as they are logged.";
      }
    }

    function fillVariables(variables) {
      const body = document.querySelector("#job-variables tbody");
      const rows = variables.map((variable) => {
        const row = document.createElement("tr");
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = variable.name;
        const value = document.createElement("td");
        if (variable.secret) {
          const masked = document.createElement("span");
          masked.className = "masked";
          masked.title = "secret: never shown";
          masked.textContent = "••••••";
          value.append(masked);
        } else {
          const code = document.createElement("code");
          code.textContent = variable.value;
          value.append(code);
        }
        row.append(name, value);
        return row;
      });
      body.replaceChildren(...rows);
      const again = document.getElementById("run-again");
      if (again) {
        const url = new URL(again.href, location.href);
        url.search = "";
        for (const variable of variables) {
          if (!variable.secret) {
            url.searchParams.set(variable.name, variable.value);
          }
        }
        again.href = url.pathname + url.search;
      }
    }

    function append(entries) {
      log.append(...entries.map(([, level, message]) => entryItem(level, message)));
      while (log.children.length > MAX_ENTRIES) {
        log.firstElementChild.remove();
        first += 1;
      }
      showEarlier();
      if (following && entries.length) {
        toEnd();
      }
    }

    function toEnd() {
      window.scrollTo(0, document.documentElement.scrollHeight);
    }

    async function poll() {
      timer = null;
      if (final || document.hidden) {
        return;
      }
      let moved = false;
      try {
        const response = await ask("offset=" + offset);
        if (response.ok) {
          const update = await response.json();
          moved = update.entries.length > 0 || update.final;
          append(update.entries);
          offset = update.offset;
          apply(update);
          if (update.offset < update.count) {
            delay = 0; // more is waiting
          }
        }
      } catch (error) {
        // the server is away for a moment: try again later
      }
      delay = moved ? (delay === 0 ? 0 : FIRST_DELAY) : Math.min(SLOWEST, Math.max(FIRST_DELAY, delay * 1.5));
      schedule();
    }

    function schedule() {
      if (!final && !document.hidden && timer === null) {
        timer = setTimeout(poll, delay);
      }
    }

    async function loadEarlier() {
      earlierButton.disabled = true;
      try {
        const response = await ask("before=" + first);
        if (response.ok) {
          const update = await response.json();
          log.prepend(...update.entries.map(([, level, message]) => entryItem(level, message)));
          first = update.entries.length ? update.entries[0][0] : 0;
          showEarlier();
        }
      } finally {
        earlierButton.disabled = false;
      }
    }

    async function unlock(candidate, form) {
      key = candidate;
      const response = await ask("offset=0");
      if (!response.ok) {
        key = null;
        forgetKey(template);
        if (form) {
          const text = await response.text();
          let problem = form.querySelector(".problem");
          if (!problem) {
            problem = document.createElement("p");
            problem.className = "problem";
            problem.setAttribute("role", "alert");
            form.append(problem);
          }
          problem.textContent = text;
        }
        return;
      }
      storeKey(template, candidate);
      const update = await response.json();
      fillVariables(update.variables);
      first = 0;
      offset = 0;
      log.replaceChildren();
      if (update.count > update.entries.length) {
        // show the end of a long log: ask for the last entries rather than the first ones
        const tail = await ask("before=" + update.count);
        const end = await tail.json();
        first = end.entries.length ? end.entries[0][0] : 0;
        append(end.entries);
        offset = update.count;
      } else {
        append(update.entries);
        offset = update.offset;
      }
      apply(update);
      unlocked = true;
      fillKeys();
      details.hidden = false;
      if (!final) {
        toEnd();
      }
      const keyForm = document.getElementById("key-form");
      if (keyForm) {
        keyForm.hidden = true;
      }
      schedule();
    }

    window.addEventListener("scroll", () => {
      following = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
    }, {passive: true});
    earlierButton.addEventListener("click", loadEarlier);
    showEarlier();
    if (!unlocked) {
      earlier.hidden = true;
    }
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) {
        delay = FIRST_DELAY;
        schedule();
      }
    });
    setInterval(() => {
      if (running) {
        document.getElementById("job-duration").textContent =
          duration(running.duration + (Date.now() - running.at) / 1000);
      }
    }, 1000);

    const keyForm = document.getElementById("key-form");
    if (keyForm) {
      keyForm.addEventListener("submit", (submitted) => {
        submitted.preventDefault();
        unlock(keyForm.elements.key.value, keyForm);
      });
    }
    if (keyed && key) {
      if (unlocked) {
        fillKeys();
      } else {
        unlock(key, null);
        return;
      }
    }
    if (unlocked && !final) {
      state.textContent = "The job is running: new entries appear as they are logged.";
      toEnd();
      schedule();
    }
  }

  // A template's form.

  function runForm(form) {
    form.addEventListener("submit", () => {
      const key = form.elements.key;
      if (key && key.value) {
        storeKey(form.dataset.template, key.value);
      }
    });
    const add = document.getElementById("add-variable");
    if (add) {
      add.hidden = false;
      add.addEventListener("click", () => {
        const rows = document.querySelectorAll("#new-variables .row");
        const row = rows[rows.length - 1].cloneNode(true);
        const number = rows.length + 1;
        for (const input of row.querySelectorAll("input")) {
          input.value = "";
          input.id = input.name + "-" + number;
        }
        for (const label of row.querySelectorAll("label")) {
          label.htmlFor = (label.textContent === "Name" ? "new-name-" : "new-value-") + number;
        }
        add.before(row);
        row.querySelector("input").focus();
      });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    const article = document.getElementById("job");
    if (article) {
      jobPage(article);
    }
    const form = document.getElementById("run-form");
    if (form) {
      runForm(form);
    }
  });
})();
