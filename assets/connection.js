() => {
  // Says so when the Tunewise server stops answering (restarting, gone), and when it is back. Runs keep
  // training in their own processes meanwhile; a reload finds the wizard as it was (gr.BrowserState).
  const banner = document.createElement("div");
  banner.id = "tw-connection";
  banner.setAttribute("role", "status");
  banner.hidden = true;
  document.body.prepend(banner);
  let misses = 0, lost = false;
  const say = (text, cls) => { banner.textContent = text; banner.className = cls; banner.hidden = false; };
  const check = async () => {
    try {
      const answer = await fetch("gradio_api/queue/status", { cache: "no-store" });
      if (!answer.ok && answer.status !== 401) throw new Error(String(answer.status));
      misses = 0;
      if (lost) {
        lost = false;
        say("The Tunewise server answers again. Reload the page to reconnect: the wizard keeps your choices, " +
            "and runs kept training meanwhile.", "tw-connection tw-connection-back");
      }
    } catch (error) {
      misses += 1;
      if (misses >= 2 && !lost) {
        lost = true;
        say("Lost the connection to the Tunewise server (restarting, or stopped). Runs keep training in " +
            "their own processes; this page says so here when the server is back.", "tw-connection tw-connection-lost");
      }
    }
  };
  setInterval(check, 3000);
}
