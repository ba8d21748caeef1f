using System.Text;
using Vmsnap.Live.Libvirt;

namespace Vmsnap.Cli.Commands;

/// <summary><c>vmsnap snapshot list --domain NAME</c>: libvirt's snapshots beside the disks', one row per name, disagreements flagged.</summary>
internal static class DomainList
{
    internal static int Print(string domain, string? connect, bool asJson)
    {
        IReadOnlyList<LibvirtSnapshotView> views = LibvirtSnapshots.List(domain, connect);
        if (asJson)
        {
            Cli.WriteJson(new DomainListJson(domain, views.Select(v => new DomainSnapshotJson(v.Name, v.InLibvirt, v.Current, v.Parent,
                v.Disks.ToDictionary(d => d.Key, d => d.Value), v.Problem)).ToArray()), CliJsonWithNulls.Default.DomainListJson);
        }
        else
        {
            var targets = views.FirstOrDefault()?.Disks.Keys.ToList() ?? [];
            var sb = new StringBuilder();
            sb.Append($"{"NAME",-20} {"LIBVIRT",-8} {"PARENT",-16} ");
            foreach (string t in targets) sb.Append($"{t,-6} ");
            sb.Append("AGREE\n");
            foreach (LibvirtSnapshotView v in views)
            {
                sb.Append($"{v.Name,-20} {(v.Current ? "current" : v.InLibvirt ? "yes" : "no"),-8} {v.Parent ?? "-",-16} ");
                foreach (string t in targets) sb.Append($"{v.Disks[t] ?? "-",-6} ");
                sb.Append(v.Problem is null ? "yes" : "NO: " + v.Problem).Append('\n');
            }
            Console.Out.Write(sb.ToString());
        }
        return views.Any(v => v.Problem is not null) ? Cli.ExitFailure : Cli.ExitOk;
    }

    /// <summary>JSON of <c>snapshot list --domain --json</c>.</summary>
    internal sealed record DomainListJson(string Domain, IReadOnlyList<DomainSnapshotJson> Snapshots);

    /// <summary>One name: in libvirt, current, its parent, the snapshot ID on each disk (null: none), the disagreement (null: none).</summary>
    internal sealed record DomainSnapshotJson(string Name, bool InLibvirt, bool Current, string? Parent, Dictionary<string, string?> Disks, string? Problem);
}
