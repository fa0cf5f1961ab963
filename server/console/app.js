// Sign-in and the page router (#prefixes, #playground, ...). A tenant's key gets the tenant's
// pages; the admin key the operator's (the tenant pages' routes refuse the admin key).
import { ApiError, identify, key } from "./api.js";
import { clear } from "./dom.js";
import { showEnsembles } from "./ensembles.js";
import { showFineTuning } from "./fine-tuning.js";
import { showKeys } from "./keys.js";
import { showOperator } from "./operator.js";
import { showPlayground } from "./playground.js";
import { showPrefixes } from "./prefixes.js";
import { showUsage } from "./usage.js";

const PAGES = {
  tenant: {
    prefixes: showPrefixes,
    playground: showPlayground,
    "fine-tuning": showFineTuning,
    ensembles: showEnsembles,
    usage: showUsage,
    keys: showKeys,
  },
  admin: {
    operator: showOperator,
    usage: showUsage,
  },
};

const $ = (id) => document.getElementById(id);
let leave = null; // what the current page stops (streams, polling) when another replaces it
let role = null; // "tenant" or "admin", known from the key (kept in memory only)

function signedOut(message = "") {
  key.clear();
  role = null;
  $("nav").hidden = true;
  $("page").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("api-key").focus();
}

function refused(error) {
  return error instanceof ApiError && error.status === 401;
}

async function route() {
  if (!key.get()) return signedOut();
  if (!role) {
    try {
      role = await identify();
    } catch (error) {
      return signedOut(refused(error) ? "That key was refused." : error.message);
    }
  }
  const pages = PAGES[role];
  const names = Object.keys(pages);
  const asked = location.hash.slice(1);
  const name = asked in pages ? asked : names[0];
  for (const link of document.querySelectorAll("#nav a")) {
    link.hidden = !(link.dataset.page in pages);
    link.classList.toggle("current", link.dataset.page === name);
  }
  $("role").textContent = role === "admin" ? "admin" : "";
  if (leave) leave();
  leave = null;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  const page = clear($("page"));
  page.hidden = false;
  page.dataset.page = name;
  try {
    leave = (await pages[name](page, { role })) || null;
  } catch (error) {
    if (refused(error)) signedOut("That key was refused.");
    else throw error;
  }
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  key.set($("api-key").value.trim());
  $("api-key").value = "";
  role = null;
  route();
});

$("sign-out").addEventListener("click", () => {
  if (leave) leave();
  leave = null;
  signedOut();
});

window.addEventListener("hashchange", route);
route();
