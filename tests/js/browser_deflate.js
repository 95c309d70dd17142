// Two Chromium tabs on the chat page, against an edge started with --compress: Chromium offers
// permessage-deflate, the edge agrees it, and a long chat line broadcast by one tab shows up in
// both. Prints one JSON line: each tab's handshake Sec-WebSocket-Extensions (from the DevTools
// protocol) and whether the line was shown.
// Usage: node browser_deflate.js http://127.0.0.1:PORT
const path = require("path")
const { chromium } = require(path.join(__dirname, "..", "..", "node_modules", "playwright-core"))

const [base] = process.argv.slice(2)
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium"
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"]

async function tab(browser, user) {
  const page = await (await browser.newContext()).newPage()
  const cdp = await page.context().newCDPSession(page)
  await cdp.send("Network.enable")
  const seen = { extensions: null }
  cdp.on("Network.webSocketHandshakeResponseReceived", ({ response }) => {
    const headers = response.headers || {}
    const key = Object.keys(headers).find(k => k.toLowerCase() === "sec-websocket-extensions")
    seen.extensions = key ? headers[key] : ""
  })
  await page.goto(`${base}/?user=${user}`)
  await page.waitForSelector("text=joined room:lobby", { timeout: 15000 })
  return { page, seen }
}

;(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS })
  try {
    const a = await tab(browser, "alice")
    const b = await tab(browser, "bob")
    const line = "compressed once for every tab " + "la ".repeat(330) + "end"
    await a.page.fill("#chat-input", line)
    await a.page.press("#chat-input", "Enter")
    const shown = (text) => document.getElementById("messages").textContent.includes(text)
    await b.page.waitForFunction(shown, line, { timeout: 10000 })
    await a.page.waitForFunction(shown, line, { timeout: 10000 })
    console.log(JSON.stringify({ extensions: [a.seen.extensions, b.seen.extensions], shown: true,
                                 length: line.length }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
