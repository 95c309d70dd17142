// A web-app example's page (examples/fastapi, examples/django) in two real browsers: alice and
// bob log in through the login form; each page loads phoenix.js from the edge and joins its
// user's notifications channel with the token the app rendered (status "joined"). Bob sends
// alice a notification through the page's form (the app publishes it), alice sends herself
// one; each is resent until it shows, since a channel joined a moment ago may miss the app's
// first publishes. Prints one JSON line with what each page shows, and saves a screenshot of
// alice's page as ARTIFACT_DIR/NAME-alice.png.
// Usage: node browser_webapp.js http://127.0.0.1:PORT ARTIFACT_DIR NAME
const path = require("path")
const { chromium } = require(path.join(__dirname, "..", "..", "node_modules", "playwright-core"))

const [base, artifacts, name] = process.argv.slice(2)
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium"
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"]

async function logIn(browser, user) {
  const page = await (await browser.newContext()).newPage()
  const consoleLines = []
  page.on("console", msg => consoleLines.push(msg.text()))
  await page.goto(`${base}/`)
  await page.fill("input[name=username]", user)
  await page.click("button:has-text('Log in')")   // POST /login, redirected to the page
  try {
    await page.waitForSelector("#status >> text=joined", { timeout: 15000 })
  } catch (err) {
    throw new Error(`${user}: no "joined" (status: ${await page.textContent("#status")}; ` +
                    `console: ${consoleLines})`)
  }
  return page
}

async function notifyUntilShown(from, to, user, body) {
  for (let attempt = 0; attempt < 20; attempt++) {
    await from.fill("#notify input[name=to]", user)
    await from.fill("#notify input[name=body]", body)
    await from.click("#notify button")
    await from.waitForSelector("#sent >> text=sent", { timeout: 5000 })
    await from.evaluate(() => { document.getElementById("sent").textContent = "" })
    try {
      await to.waitForSelector(`#notifications li >> text=${body}`, { timeout: 500 })
      return
    } catch (_) { /* not subscribed yet when it was published: send it again */ }
  }
  throw new Error(`"${body}" never showed on ${user}'s page`)
}

;(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS })
  try {
    const alice = await logIn(browser, "alice")
    const bob = await logIn(browser, "bob")
    await notifyUntilShown(bob, alice, "alice", "hello alice, from bob's page")
    await notifyUntilShown(alice, alice, "alice", "a note to myself")
    await alice.screenshot({ path: path.join(artifacts, `${name}-alice.png`) })
    const items = page => page.$$eval("#notifications li", lis => lis.map(li => li.innerText))
    console.log(JSON.stringify({
      alice: { status: await alice.textContent("#status"), notifications: await items(alice) },
      bob: { status: await bob.textContent("#status"), notifications: await items(bob) },
    }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
