// The benchmark's peer service: `Bench/ingest` returns at once. The benchmark sends to it with
// `/send?delay=1h`, so Restate's ingress only accepts (as the gateway does with no worker).
// Serves h2c on 127.0.0.1:$PORT and prints READY.
//
// Node 20 has no Promise.withResolvers (ES2024), which the SDK uses: the stand-in comes first.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new this((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}
const restate = await import("@restatedev/restate-sdk");
const http2 = await import("node:http2");

const bench = restate.service({
  name: "Bench",
  handlers: { ingest: async (_ctx, _input) => {} },
});
const server = http2.createServer(restate.createEndpointHandler({ services: [bench] }));
server.listen(Number(process.env.PORT), "127.0.0.1", () => console.log("READY"));
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
