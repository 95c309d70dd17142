// Two real browser tabs on the chat page: one on WebSocket, one forced to LongPoll.
// Each sends a message and must see the other's. Prints one JSON line with what each tab
// shows, and saves a screenshot of each tab into the artifacts directory.
// Usage: node browser_chat.js http://127.0.0.1:PORT ARTIFACT_DIR
const path = require("path")
const { chromium } = require(path.join(__dirname, "..", "..", "node_modules", "playwright-core"))

const [base, artifacts] = process.argv.slice(2)
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium"
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"]

async function tab(browser, query) {
  // An https:// edge in the tests has a self-signed certificate.
  const options = base.startsWith("https:") ? { ignoreHTTPSErrors: true } : {}
  const page = await (await browser.newContext(options)).newPage()
  await page.goto(`${base}/?${query}`)
  await page.waitForSelector("text=joined room:lobby", { timeout: 15000 })
  return page
}

async function say(page, text) {
  await page.fill("#chat-input", text)
  await page.press("#chat-input", "Enter")
}

;(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS })
  try {
    const ws = await tab(browser, "user=wsuser")
    const lp = await tab(browser, "user=lpuser&transport=longpoll")
    await say(ws, "hello from the websocket tab")
    await lp.waitForSelector("text=hello from the websocket tab", { timeout: 10000 })
    await say(lp, "hello from the longpoll tab")
    await ws.waitForSelector("text=hello from the longpoll tab", { timeout: 10000 })
    // Who is online (phoenix.js Presence on the page): both names in both tabs.
    const bothOnline = () => {
      const text = document.getElementById("online").textContent
      return text.includes("wsuser") && text.includes("lpuser")
    }
    await ws.waitForFunction(bothOnline, null, { timeout: 10000 })
    await lp.waitForFunction(bothOnline, null, { timeout: 10000 })
    await ws.screenshot({ path: path.join(artifacts, "chat-websocket-tab.png") })
    await lp.screenshot({ path: path.join(artifacts, "chat-longpoll-tab.png") })
    const online = { websocket_tab: await ws.textContent("#online"), longpoll_tab: await lp.textContent("#online") }
    const transports = await lp.evaluate(() => performance.getEntriesByType("resource")
      .map(e => e.name).filter(n => n.includes("/socket/")).map(n => new URL(n).pathname))
    const messages = { websocket_tab: await ws.textContent("#messages"), longpoll_tab: await lp.textContent("#messages") }
    // The WebSocket tab closes: the LongPoll tab sees that user leave.
    await ws.close()
    await lp.waitForFunction(() => !document.getElementById("online").textContent.includes("wsuser"),
                             null, { timeout: 10000 })
    console.log(JSON.stringify({
      ...messages,
      online,
      online_after_ws_closed: await lp.textContent("#online"),
      longpoll_requests: transports.filter(p => p.endsWith("/longpoll")).length,
    }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
