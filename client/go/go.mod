module classifyd.example/client/go

// build.sh builds in GOPATH mode from Debian's packages and ignores this file. It is here for machines with a
// module proxy, at the oldest versions the code is built with (Debian 12's); `go mod tidy` there pins the rest.
go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
