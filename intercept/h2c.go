package intercept

import (
	"context"
	"time"

	"golang.org/x/net/http2"

	"github.com/msbtap/msbtap/proxy"
)

// serveH2C proxies cleartext HTTP/2 with prior knowledge (gRPC without
// TLS, say) stream by stream: msbtap is the HTTP/2 server the sandbox
// talks to, so that every stream's :authority is checked as an HTTP/1
// request's Host is, and an HTTP/2 client of the flow's own upstream
// connection carries the allowed streams. A refused stream gets its 403
// and the others go on.
func (h *Handler) serveH2C(ctx context.Context, fl conn, peeked []byte) error {
	guest := proxy.WrapConn(fl.guest, peeked, &fl.f.Up, &fl.f.Down)
	defer guest.Close()
	defer fl.host.Close()
	rh := &requestHandler{h: h, fl: fl, scheme: "http"}
	// The bytes are the server's: no compression asked for on the
	// client's behalf.
	cc, err := (&http2.Transport{AllowHTTP: true, DisableCompression: true}).NewClientConn(fl.host)
	if err != nil {
		rh.upErr = "upstream HTTP/2: " + err.Error()
	} else {
		rh.rt = cc
		defer cc.Close()
	}
	(&http2.Server{IdleTimeout: 5 * time.Minute}).ServeConn(guest, &http2.ServeConnOpts{Context: ctx, Handler: rh.wrap()})
	rh.wg.Wait()
	return nil
}
