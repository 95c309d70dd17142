// The guide's page (examples/guide/static/index.html) in two real browser tabs: an anonymous
// visitor and a visitor with a user token (?token=...). Each waits for the guide's
// "Joined successfully" console line, types a message and presses Enter; both tabs must list
// both messages. Prints one JSON line with what each tab shows and logged, and saves a
// screenshot of the anonymous tab into the artifacts directory.
// Usage: node browser_guide.js http://127.0.0.1:PORT ARTIFACT_DIR USER_TOKEN
const path = require("path")
const { chromium } = require(path.join(__dirname, "..", "..", "node_modules", "playwright-core"))

const [base, artifacts, token] = process.argv.slice(2)
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium"
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"]

async function tab(browser, query) {
  const page = await (await browser.newContext()).newPage()
  const consoleLines = []
  const joined = new Promise(resolve => page.on("console", msg => {
    consoleLines.push(msg.text())
    if (msg.text().startsWith("Joined successfully")) resolve()
  }))
  await page.goto(`${base}/${query}`)
  await Promise.race([joined, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`no "Joined successfully" in ${query || "/"}: ${consoleLines}`)), 15000))])
  return { page, consoleLines }
}

async function say(page, text) {
  await page.fill("#chat-input", text)
  await page.press("#chat-input", "Enter")
}

;(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS })
  try {
    const anonymous = await tab(browser, "")
    const user = await tab(browser, `?token=${encodeURIComponent(token)}`)
    await say(anonymous.page, "hello from the anonymous tab")
    await user.page.waitForSelector("#messages li >> text=hello from the anonymous tab", { timeout: 10000 })
    await say(user.page, "hello from the user tab")
    await anonymous.page.waitForSelector("#messages li >> text=hello from the user tab", { timeout: 10000 })
    await anonymous.page.screenshot({ path: path.join(artifacts, "guide-anonymous-tab.png") })
    const items = page => page.$$eval("#messages li", lis => lis.map(li => li.innerText))
    console.log(JSON.stringify({
      anonymous_tab: await items(anonymous.page),
      user_tab: await items(user.page),
      input_after_enter: await anonymous.page.inputValue("#chat-input"),
      console: { anonymous_tab: anonymous.consoleLines, user_tab: user.consoleLines },
    }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
