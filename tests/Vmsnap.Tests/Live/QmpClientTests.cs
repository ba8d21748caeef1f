using System.Text.Json.Nodes;
using Vmsnap.Live.Qmp;
using Vmsnap.Live;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Live;

/// <summary>The QMP client against a real QEMU (no guest): commands, QEMU's errors, events with QEMU's timestamps, a QEMU that goes away.</summary>
[Trait("Category", "Unit")]
public class QmpClientTests
{
    private static (QemuVm Vm, string Socket) Start(TempDir dir)
    {
        string socket = dir.File("c.qmp");
        return (QemuVm.Start(["-machine", "none", "-qmp", $"unix:{socket},server=on,wait=off"], paused: true), socket);
    }

    [QemuFact]
    public void Commands_errors_and_events_come_back_with_QEMUs_words_and_timestamps()
    {
        string version = QemuInstall.Current.Version;
        using var dir = new TempDir();
        (QemuVm vm, string socket) = Start(dir);
        using (vm)
        using (QmpClient qmp = QmpClient.Connect(socket))
        {
            Assert.Equal(version, $"{qmp.QemuVersion.Major}.{qmp.QemuVersion.Minor}");
            Assert.Equal("prelaunch", qmp.Execute("query-status")!["status"]!.GetValue<string>());

            var e = Assert.Throws<QmpException>(() => qmp.Execute("no-such-command"));
            Assert.Equal("CommandNotFound", e.ErrorClass);
            Assert.Contains("QEMU refused 'no-such-command'", e.Message);
            Assert.Contains("no-such-command", e.Message);
            e = Assert.Throws<QmpException>(() => qmp.Execute("migrate-set-parameters", new JsonObject { ["downtime-limit"] = -5 }));
            Assert.StartsWith("QEMU refused 'migrate-set-parameters': ", e.Message);
            Assert.Equal("GenericError", e.ErrorClass);

            long mark = qmp.EventMark;
            DateTimeOffset before = DateTimeOffset.UtcNow;
            qmp.Execute("cont");
            qmp.Execute("stop");
            QmpEvent? resume = qmp.WaitForEvent("RESUME", mark, TimeSpan.FromSeconds(10));
            QmpEvent? stop = qmp.WaitForEvent("STOP", mark, TimeSpan.FromSeconds(10));
            Assert.NotNull(resume);
            Assert.NotNull(stop);
            Assert.True(stop.Sequence > resume.Sequence);
            Assert.True(stop.Timestamp >= resume.Timestamp);
            Assert.True(Math.Abs((resume.Timestamp - before).TotalSeconds) < 30, $"QEMU's timestamp {resume.Timestamp} is far from now");

            // QEMU's QMP socket serves one client at a time: a second one gets a clear error, not a hang.
            var busy = Assert.Throws<QmpException>(() => QmpClient.Connect(socket, TimeSpan.FromSeconds(2)));
            Assert.Contains("another client", busy.Message);

            vm.Dispose();   // SIGKILL
            var gone = Assert.Throws<QmpException>(() =>
            {
                for (int i = 0; i < 100; i++) { qmp.Execute("query-status"); Thread.Sleep(50); }
            });
            Assert.Contains("did QEMU exit?", gone.Message);
            Assert.True(qmp.IsClosed);
        }
    }

    [Fact]
    public void A_socket_that_is_not_there_says_how_to_start_QEMU()
    {
        using var dir = new TempDir();
        var e = Assert.Throws<QmpException>(() => QmpClient.Connect(dir.File("none.qmp")));
        Assert.Contains($"-qmp unix:{dir.File("none.qmp")},server=on,wait=off", e.Message);
    }
}
