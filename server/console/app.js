// Sign-in and the page router (#prefixes, #playground, #fine-tuning).
import { ApiError, call, key } from "./api.js";
import { clear } from "./dom.js";
import { showFineTuning } from "./fine-tuning.js";
import { showPlayground } from "./playground.js";
import { showPrefixes } from "./prefixes.js";

const PAGES = {
  prefixes: showPrefixes,
  playground: showPlayground,
  "fine-tuning": showFineTuning,
};

const $ = (id) => document.getElementById(id);
let leave = null; // what the current page stops (streams, polling) when another replaces it

function signedOut(message = "") {
  key.clear();
  $("nav").hidden = true;
  $("page").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("api-key").focus();
}

async function route() {
  if (!key.get()) return signedOut();
  const name = location.hash.slice(1) in PAGES ? location.hash.slice(1) : "prefixes";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("current", link.dataset.page === name);
  }
  if (leave) leave();
  leave = null;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  const page = clear($("page"));
  page.hidden = false;
  page.dataset.page = name;
  try {
    leave = (await PAGES[name](page)) || null;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) signedOut("That key was refused.");
    else throw error;
  }
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  key.set($("api-key").value.trim());
  $("api-key").value = "";
  try {
    await call("GET", "/v1/models"); // any tenant route: 401 for a wrong key
  } catch (error) {
    signedOut(error instanceof ApiError && error.status === 401 ? "That key was refused." : error.message);
    return;
  }
  route();
});

$("sign-out").addEventListener("click", () => {
  if (leave) leave();
  leave = null;
  signedOut();
});

window.addEventListener("hashchange", route);
route();
